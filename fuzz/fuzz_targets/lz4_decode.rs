//! Any bytes, decompressed as LZ4 into a declared size, never panic or write
//! past it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::codec(ferry::codec::CodecId::Lz4, data);
});
