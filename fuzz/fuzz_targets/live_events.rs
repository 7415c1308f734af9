//! Any bytes, read as a peer's server-sent events (in chunks they choose),
//! a merged stream's Last-Event-ID and a session cookie, never panic.
//! Needs the agent.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::agent::fuzz::live_events(data);
});
