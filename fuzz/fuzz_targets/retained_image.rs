//! Any bytes, opened as a retained image (the memory a VM left a node with,
//! kept for its failback) and read page by page, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::retained_image(data);
});
