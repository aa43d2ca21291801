//! Session affinity end to end: three backends, the real `kvroute serve` with
//! `session-affinity-filter` and a load scorer that spreads equal requests, real Envoy in
//! front. The first turn of a conversation is answered with `x-session-token`; the turns
//! that send it back stay on the pod that served the first, while requests without it
//! spread; a token naming a pod that is not in the pool pins nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::*;

const CONFIG: &str = "
plugins: [{type: session-affinity-filter}, {type: load-scorer}, {type: max-score-picker}]
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-filter}
  - {pluginRef: load-scorer}
  - {pluginRef: max-score-picker}
";

/// One chat turn through Envoy on `port`, with `token` sent back if given: the backend that
/// served it and the session token the answer carries.
async fn turn(port: u16, turn: usize, token: Option<&str>) -> (String, String) {
    let body = serde_json::json!({
        "model": "llama",
        "messages": [{"role": "user", "content": format!("turn {turn}")}]
    });
    let headers: Vec<(&str, &str)> = token.map(|t| ("x-session-token", t)).into_iter().collect();
    let reply = http(
        port,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    (
        reply.header("x-served-by").to_owned(),
        reply.header("x-session-token").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_token_keeps_a_conversation_on_its_pod() {
    let dir = scratch("session");
    let backends = Backends::start(3, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--config-text", CONFIG]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;

    // Without a token, equal requests take turns: the pin below is the filter's doing.
    let mut spread = HashSet::new();
    for i in 0..6 {
        let (served, token) = turn(envoy.port, i, None).await;
        assert!(!token.is_empty(), "every answer carries a token");
        spread.insert(served);
    }
    assert_eq!(
        spread.len(),
        3,
        "requests without a token spread: {spread:?}"
    );

    // The first turn's answer names the pod that served it; every later turn sends that
    // back and is served there.
    let (home, token) = turn(envoy.port, 100, None).await;
    for i in 101..107 {
        let (served, again) = turn(envoy.port, i, Some(&token)).await;
        assert_eq!(served, home, "turn {i} left its pod");
        assert_eq!(again, token);
    }

    // A token for a pod that is not a candidate keeps every pod: requests still spread.
    // base64("10.255.0.1:8000").
    let gone = "MTAuMjU1LjAuMTo4MDAw";
    let mut spread = HashSet::new();
    for i in 200..206 {
        spread.insert(turn(envoy.port, i, Some(gone)).await.0);
    }
    assert_eq!(spread.len(), 3, "an unknown pod pins nothing: {spread:?}");
}
