//! Any byte stream, fed to the resumable decoder in arbitrary pieces, gives the
//! same frames as fed whole.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::stream(data);
});
