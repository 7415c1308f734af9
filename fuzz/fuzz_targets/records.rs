//! Any bytes, decoded as a record an agent reads back from etcd or its disk
//! (the first byte picks which), never panic; a record that decodes reads
//! back the same once written again. Needs the agent: `--features agent`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::agent::fuzz::records(data);
});
