//! Any bytes, decoded as a page batch and applied, never panic; whatever is
//! accepted touches only pages inside the guest.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::batch(data);
});
