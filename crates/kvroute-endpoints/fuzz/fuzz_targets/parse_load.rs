//! Any text as a pod's `/metrics` body: a `PodLoad` or a `LoadError`, never a panic; and a
//! load read is in range (KV-cache usage a fraction in 0..=1, the prompt totals finite and
//! not negative).
//!
//! The scraper refuses bodies that are not UTF-8 before parsing; invalid bytes are replaced
//! here rather than skipped, so that every input reaches the parser.

#![no_main]

use kvroute_endpoints::parse_load;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(load) = parse_load(&text) {
        assert!(
            (0.0..=1.0).contains(&load.kv_usage),
            "kv_usage {} out of range",
            load.kv_usage
        );
        assert!(load.running_loras.iter().all(|a| !a.is_empty()));
        assert!(load.waiting_loras.iter().all(|a| !a.is_empty()));
        if let Some(p) = load.prompts {
            let sane = |v: f64| v.is_finite() && v >= 0.0;
            assert!(sane(p.tokens) && sane(p.requests), "prompt totals {p:?}");
        }
    }
});
