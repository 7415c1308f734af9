//! Any bytes, decoded as a guest's saved state (synthetic or KVM), never
//! panic; a KVM state that decodes fits the guest it names.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::guest_state(data);
});
