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

/// Prompts are the users' data: no log line carries them, at any level, whatever the
/// request (routed, streamed, or refused with its own text in the error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_prompt_text_reaches_the_logs() {
    const SECRET: &str = "PROMPT-SECRET-7f3a9c";
    let dir = scratch("no-prompt-logs");
    let backends = Backends::start(1, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--log", "trace"]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let bodies = [
        format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{SECRET}"}}]}}"#),
        format!(
            r#"{{"model":"m","stream":true,"messages":[{{"role":"system","content":"{SECRET}"}},{{"role":"user","content":"hi"}}]}}"#
        ),
        // Refused: the parser's error names the value it did not expect.
        format!(r#"{{"model":"m","messages":"{SECRET}"}}"#),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let reply = http(
            envoy.port,
            "POST",
            "/v1/chat/completions",
            &[],
            body.clone().into_bytes(),
        )
        .await;
        assert_eq!(reply.status, if i < 2 { 200 } else { 400 }, "{reply:?}");
    }
    let prompt = format!(r#"{{"model":"m","prompt":"{SECRET}"}}"#);
    let reply = http(
        envoy.port,
        "POST",
        "/v1/completions",
        &[],
        prompt.into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let log = kvroute.log_text();
    assert!(log.lines().count() > 20, "trace logs were written: {log}");
    assert!(
        !log.contains(SECRET),
        "a prompt reached the logs: {}",
        log.lines().find(|l| l.contains(SECRET)).unwrap_or_default()
    );
}
