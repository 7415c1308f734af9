//! Any sequence of messages, fed to the receiver's state machine with its
//! batches applied, never panics, touches only the guest's pages, and runs a
//! guest only after a verified switchover.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzz::receiver(data);
});
