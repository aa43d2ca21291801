//! `--log-format json`: every line kvroute logs is one JSON object a log collector can read
//! without patterns (level, target, message and the event's fields).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line() {
    let dir = scratch("json-logs");
    let backends = Backends::start(1, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--log-format", "json"]).await;
    let text = kvroute.log_text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "kvroute logged nothing");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("following") || l.contains("listening") || l.contains("serving")),
        "{text}"
    );
}
