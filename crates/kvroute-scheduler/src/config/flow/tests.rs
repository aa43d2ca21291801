use std::time::Duration;

use super::*;
use crate::admission::{AdmissionSettings, FlowSettings};
use crate::config::{ConfigError, EndpointPickerConfig};

#[test]
fn quantities_as_kubernetes_writes_them() {
    for (s, want) in [
        ("100", 100),
        ("1k", 1_000),
        ("500M", 500_000_000),
        ("1Gi", 1 << 30),
        ("1.5Ki", 1536),
        (" 2 ", 2),
    ] {
        assert_eq!(parse_quantity(s), Ok(want), "{s}");
    }
    for bad in ["", "1x", "-5", "1.5", "k", "1e3", "99999999999E"] {
        assert!(parse_quantity(bad).is_err(), "{bad}");
    }
}

#[test]
fn durations_as_go_writes_them() {
    let ms = Duration::from_millis;
    for (s, want) in [
        ("60s", ms(60_000)),
        ("200ms", ms(200)),
        ("1m30s", ms(90_000)),
        ("1.5h", ms(5_400_000)),
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("250us", Duration::from_micros(250)),
    ] {
        assert_eq!(parse_go_duration(s), Ok(want), "{s}");
    }
    for bad in ["", "60", "s", "-1s", "1d", "1m30", "1..5s"] {
        assert!(parse_go_duration(bad).is_err(), "{bad}");
    }
}

fn admission(yaml: &str) -> Result<AdmissionSettings, ConfigError> {
    EndpointPickerConfig::parse(yaml)?.admission_from(yaml)
}

fn err(yaml: &str) -> String {
    admission(yaml).unwrap_err().to_string()
}

#[test]
fn the_detector_is_upstreams_by_default_or_the_one_named() {
    let none = admission("plugins: []\n").unwrap();
    assert_eq!(none.detector, UtilizationDetector::default());
    assert_eq!(none.flow, None, "no flowControl gate, no queue");
    let want = UtilizationDetector::new(2, 0.85, Duration::from_millis(150)).unwrap();
    // Named by the deprecated top-level section (upstream's flow-control guide's example).
    let top = "plugins:\n- type: utilization-detector\n  name: d\n  parameters:\n    queueDepthThreshold: 2\n    kvCacheUtilThreshold: 0.85\n    metricsStalenessThreshold: 150ms\n    headroom: 0.2\nsaturationDetector:\n  pluginRef: d\n";
    assert_eq!(admission(top).unwrap().detector, want);
    // flowControl.saturationDetector wins over the top level, even with the gate off.
    let both = "plugins:\n- type: utilization-detector\n  name: d\n  parameters: {queueDepthThreshold: 2}\n- type: utilization-detector\n  name: e\nsaturationDetector: {pluginRef: d}\nflowControl:\n  saturationDetector: {pluginRef: e}\n";
    assert_eq!(
        admission(both).unwrap().detector,
        UtilizationDetector::default()
    );
    // Unnamed: the plugin called utilization-detector, if any.
    let plain = "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 9}\n";
    assert_eq!(
        admission(plain).unwrap().detector,
        UtilizationDetector::new(9, 0.8, Duration::from_millis(200)).unwrap()
    );
}

#[test]
fn a_wrong_detector_or_reference_names_its_line() {
    for (yaml, line, what) in [
        (
            "plugins:\n- type: utilization-detector\n  parameters:\n    queueDepthThreshold: 0\n",
            "line 2",
            "queueDepthThreshold",
        ),
        (
            "plugins:\n- type: utilization-detector\n  parameters:\n    kvCacheUtilThreshold: 1.5\n",
            "line 2",
            "kvCacheUtilThreshold",
        ),
        (
            "plugins:\n- type: utilization-detector\n  parameters:\n    metricsStalenessThreshold: 5\n",
            "line 4",
            "not a duration",
        ),
        (
            "plugins:\n- type: utilization-detector\n  parameters:\n    headroom: -1\n",
            "line 2",
            "headroom",
        ),
        (
            "plugins:\n- type: utilization-detector\n  parameters:\n    queueDepth: 3\n",
            "line 4",
            "queueDepth",
        ),
        (
            "plugins:\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: missing\n",
            "line 4",
            "\"missing\"",
        ),
        (
            "plugins:\n- type: queue-scorer\nflowControl:\n  saturationDetector:\n    pluginRef: queue-scorer\n",
            "line 2",
            "saturation detector",
        ),
    ] {
        let e = err(yaml);
        assert!(e.contains(line) && e.contains(what), "{yaml}: {e}");
    }
}

#[test]
fn flow_control_reads_upstreams_keys_with_the_gate() {
    let yaml = "featureGates: [flowControl]\nflowControl:\n  maxBytes: 1Gi\n  maxRequests: \"2k\"\n  defaultRequestTTL: 30s\n  noEndpointRequestTTL: 0s\n  defaultPriorityBand: {maxRequests: 50, fairnessPolicyRef: global-strict-fairness-policy}\n  defaultNegativePriorityBand: {maxRequests: 5}\n  priorityBands:\n  - priority: 10\n    maxBytes: 500M\n    orderingPolicyRef: fcfs-ordering-policy\n  - priority: -1\n    maxRequests: 0\n  usageLimitPolicyPluginRef: \"\"\n  enableEviction: false\n";
    let flow = admission(yaml).unwrap().flow.unwrap();
    assert_eq!(flow.max_bytes, Some(1 << 30));
    assert_eq!(flow.max_requests, Some(2_000));
    assert_eq!(flow.ttl, Some(Duration::from_secs(30)));
    assert_eq!(flow.no_endpoint_ttl, None, "0s: wait for an endpoint");
    assert_eq!(flow.band(10).max_bytes, 500_000_000);
    assert_eq!(flow.band(10).max_requests, DEFAULT_BAND_MAX_REQUESTS);
    // 0 reads as unset: upstream's default.
    assert_eq!(flow.band(-1).max_requests, DEFAULT_BAND_MAX_REQUESTS);
    assert_eq!(flow.band(3).max_requests, 50);
    assert_eq!(flow.band(-4).max_requests, 5);
    // The gate alone: every default.
    let gate = admission("featureGates: [flowControl]\n")
        .unwrap()
        .flow
        .unwrap();
    assert_eq!(gate, FlowSettings::default());
    assert_eq!(gate.ttl, Some(Duration::from_secs(60)));
    // The gate turned off: the section is read, not acted on.
    let off = "featureGates: [flowControl=false]\nflowControl: {maxRequests: 3}\n";
    assert_eq!(admission(off).unwrap().flow, None);
    let parsed = EndpointPickerConfig::parse(off).unwrap();
    assert_eq!(parsed.ignored_sections(), ["flowControl"]);
}

#[test]
fn flow_control_refuses_what_kvroute_does_not_do_with_its_line() {
    for (yaml, line, what) in [
        ("flowControl:\n  maxBytes: lots\n", "line 2", "lots"),
        ("flowControl:\n  maxRequests: -4\n", "line 2", "negative"),
        (
            "flowControl:\n  defaultRequestTTL: 1d\n",
            "line 2",
            "not a duration",
        ),
        ("flowControl:\n  enableEviction: true\n", "line 2", "evicts"),
        (
            "flowControl:\n  usageLimitPolicyPluginRef: soft-ceiling\n",
            "line 2",
            "usage-limit",
        ),
        (
            "flowControl:\n  priorityBands:\n  - priority: 1\n    fairnessPolicyRef: round-robin-fairness-policy\n",
            "line 3",
            "round-robin",
        ),
        (
            "flowControl:\n  defaultPriorityBand:\n    orderingPolicyRef: edf-ordering-policy\n",
            "line 3",
            "edf",
        ),
        ("flowControl:\n  queueSize: 3\n", "line 2", "queueSize"),
        (
            "featureGates: [flowControl]\nflowControl:\n  priorityBands:\n  - priority: 1\n  - priority: 2\n  - priority: 1\n",
            "line 6",
            "priority 1",
        ),
    ] {
        let e = err(yaml);
        assert!(e.contains(line) && e.contains(what), "{yaml}: {e}");
    }
}
