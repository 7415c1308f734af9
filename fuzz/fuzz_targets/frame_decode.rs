//! Any bytes, decoded as a frame and then as a message, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::frame(data);
});
