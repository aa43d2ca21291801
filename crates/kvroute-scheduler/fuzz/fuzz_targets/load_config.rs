//! Any UTF-8 text as a routing configuration (`--config-file`, re-read every 2 s while
//! serving): parsed and, when it parses, built into a scheduler, or refused with a
//! `ConfigError`; never a panic.

#![no_main]

use kvroute_scheduler::{BuildContext, EndpointPickerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = EndpointPickerConfig::parse(yaml) else {
        return;
    };
    let _ = config.feature_gates().count();
    let _ = config.metrics_path();
    let _ = config.metrics_scheme();
    let _ = config.ignored_sections();
    if let Err(e) = config.build_from(yaml, &BuildContext::new(16)) {
        let _ = e.to_string();
    }
});
