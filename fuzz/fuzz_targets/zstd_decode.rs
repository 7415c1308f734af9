//! Any bytes, decompressed as zstd into a declared size, never panic or write
//! past it (frames declaring huge contents included).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::codec(ferry::codec::CodecId::Zstd, data);
});
