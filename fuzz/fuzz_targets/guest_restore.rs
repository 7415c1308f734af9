//! Any bytes, restored as a guest (synthetic or KVM) and run for a moment,
//! never panic: out-of-range workloads are refused, extreme counters wrap.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::guest_restore(data);
});
