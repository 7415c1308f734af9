//! Any bytes, as the pieces of one connection's kept zstd stream decoded in
//! order, never panic or write past a piece's declared size.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::kept_stream(data);
});
