//! Any bytes as a patch over a region build a page or an error, never a
//! panic; a patch made of a page against a region rebuilds the page.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::patch(data);
});
