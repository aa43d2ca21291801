//! Any bytes as a KV-event payload, and as a sequence frame: an error or a batch, never a
//! panic, a hang or an allocation the input cannot back.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kvroute_events::decode_batch(data, kvroute_events::DEFAULT_MAX_BATCH_ENTRIES);
    let _ = kvroute_events::sequence(data);
});
