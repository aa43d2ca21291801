//! End to end with real Envoy: requests sent to Envoy reach the endpoint kvroute chose, in
//! every body mode the shipped config can be switched to; kvroute's local replies come back
//! through Envoy; Envoy's failure mode holds when kvroute is gone; SIGTERM drains.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::*;
use tokio::task::JoinSet;

/// One request of the mixed workload: API, streaming or not, body size.
fn workload(n: usize) -> Vec<(&'static str, Vec<u8>, bool)> {
    (0..n)
        .map(|i| {
            let stream = i % 2 == 0;
            let big = i % 3 == 0;
            let text: String = "the quick brown fox jumps over the lazy dog "
                .repeat(if big { 5_000 } else { 3 });
            let body = if i % 4 < 2 {
                serde_json::json!({
                    "model": "llama",
                    "stream": stream,
                    "messages": [
                        {"role": "system", "content": "You are terse."},
                        {"role": "user", "content": [{"type": "text", "text": text}]}
                    ]
                })
            } else {
                serde_json::json!({"model": "llama", "stream": stream, "prompt": text, "max_tokens": 8})
            };
            let path = if i % 4 < 2 {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            (path, body.to_string().into_bytes(), stream)
        })
        .collect()
}

async fn routes_every_request_to_the_chosen_endpoint(
    request_body_mode: &str,
    response_body_mode: &str,
) {
    let dir = scratch(&request_body_mode.to_lowercase());
    let backends = Backends::start(3, Duration::from_millis(150)).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &[]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::modes(
            request_body_mode,
            response_body_mode,
            kvroute.grpc_port,
            &backends.addrs,
        ),
    )
    .await;

    let requests = workload(24);
    let mut set = JoinSet::new();
    for (i, (path, body, stream)) in requests.into_iter().enumerate() {
        let port = envoy.port;
        set.spawn(async move {
            let id = format!("req-{i}");
            let hash = body_hash(&body);
            let body_len = body.len();
            let reply = http(port, "POST", path, &[("x-request-id", &id)], body).await;
            (reply, hash, stream, body_len)
        });
    }
    let mut served = HashSet::new();
    while let Some(joined) = set.join_next().await {
        let (reply, hash, stream, body_len) = joined.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}\n{}", kvroute.log_text());
        let by = reply.header("x-served-by");
        assert_eq!(
            by,
            reply.header("x-destination-seen"),
            "served by another endpoint than kvroute chose"
        );
        assert_eq!(reply.header("x-body-hash"), hash, "body changed on the way");
        // kvroute states the body's length on the headers answer, as upstream's picker
        // does; Envoy 1.40 keeps a Content-Length in BUFFERED mode only, and re-chunks
        // STREAMED and FULL_DUPLEX_STREAMED bodies whatever the processor sets (envoy
        // #38291, #39035; the option to keep it, #39067, was closed unmerged). Asserted so
        // that a change in Envoy is noticed.
        let length = reply.header("x-content-length-seen");
        if request_body_mode == "BUFFERED" {
            assert_eq!(length, body_len.to_string(), "{request_body_mode}");
        } else {
            assert_eq!(length, "none", "{request_body_mode}: Envoy now keeps it");
        }
        if stream {
            let text = reply.text();
            assert!(text.contains("data: [DONE]"), "{text}");
            for piece in SSE_PIECES {
                assert!(text.contains(&format!("\"content\":\"{piece}\"")), "{text}");
            }
        } else {
            let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(json["served_by"], by);
        }
        served.insert(by.to_owned());
    }
    assert!(
        served.len() >= 2,
        "concurrent requests should spread over endpoints: {served:?}"
    );

    // A body-less request is routed by load.
    let reply = http(envoy.port, "GET", "/v1/models", &[], Vec::new()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("x-served-by"),
        reply.header("x-destination-seen")
    );

    // A client cannot pick the pod itself: its destination header is replaced.
    let reply = http(
        envoy.port,
        "POST",
        "/v1/completions",
        &[("x-gateway-destination-endpoint", "127.0.0.1:1")],
        br#"{"model":"m","prompt":"hi"}"#.to_vec(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        backends
            .addrs
            .iter()
            .any(|a| a.to_string() == reply.header("x-served-by"))
    );

    // Envoy's access log: the upstream it used is the destination in kvroute's metadata.
    let ok = eventually(Duration::from_secs(5), async || {
        envoy
            .access_log()
            .iter()
            .filter(|l| l["path"].as_str().unwrap_or("").starts_with("/v1/"))
            .count()
            == 26
    })
    .await;
    let log = envoy.access_log();
    assert!(ok, "access log incomplete: {log:?}");
    for line in &log {
        assert_eq!(line["upstream"], line["destination"], "{line}");
    }

    // kvroute's books: every request counted, every slot given back, usage read.
    let settled = eventually(Duration::from_secs(5), async || {
        let m = kvroute.metrics().await;
        m.contains(r#"kvroute_requests_total{outcome="routed"} 25"#)
            && m.contains(r#"kvroute_responses_total{class="2xx"} 26"#)
            && !m.lines().any(|l| {
                l.starts_with("kvroute_endpoint_in_flight_requests{") && !l.ends_with(" 0")
            })
    })
    .await;
    let m = kvroute.metrics().await;
    assert!(settled, "{m}");
    assert!(
        m.contains(r#"kvroute_requests_total{outcome="routed_by_load"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"kind="completion"} "#),
        "usage was not read: {m}"
    );
    let stats = envoy.stats().await;
    assert!(stats.contains("ext_proc.streams_started: 26"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_streamed_routes_every_request_to_the_chosen_endpoint() {
    routes_every_request_to_the_chosen_endpoint("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_routes_every_request_to_the_chosen_endpoint() {
    routes_every_request_to_the_chosen_endpoint("BUFFERED", "STREAMED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_with_mode_override_routes_every_request_to_the_chosen_endpoint() {
    routes_every_request_to_the_chosen_endpoint("STREAMED", "BUFFERED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_kvroutes_400_through_envoy() {
    let dir = scratch("malformed");
    let backends = Backends::start(2, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--max-body-bytes", "100000"]).await;
    for body_mode in ["FULL_DUPLEX_STREAMED", "BUFFERED"] {
        let envoy = Envoy::start(
            &dir,
            &EnvoyOptions {
                request_body_mode: body_mode,
                response_body_mode: "FULL_DUPLEX_STREAMED",
                fail_open: false,
                grpc_port: kvroute.grpc_port,
                more_grpc_ports: &[],
                pool: &backends.addrs,
            },
        )
        .await;
        for (body, want) in [
            (
                &b"{\"model\": "[..],
                "inference error: BadRequest - error unmarshaling request bodyMap: ",
            ),
            (
                br#"{"messages":[]}"#,
                "inference error: BadRequest - model not found in request body",
            ),
            (
                br#"{"model":"m"}"#,
                "inference error: BadRequest - invalid chat completions request: must have valid messages field",
            ),
        ] {
            let reply = http(
                envoy.port,
                "POST",
                "/v1/chat/completions",
                &[],
                body.to_vec(),
            )
            .await;
            assert_eq!(reply.status, 400, "{body_mode}: {reply:?}");
            // Upstream's picker's words, so that what was built on it still matches.
            assert!(reply.text().starts_with(want), "{}", reply.text());
            assert!(reply.header("content-type").starts_with("text/plain"));
        }
        let big = serde_json::json!({"model": "m", "prompt": "x".repeat(200_000)});
        let reply = http(
            envoy.port,
            "POST",
            "/v1/completions",
            &[],
            big.to_string().into_bytes(),
        )
        .await;
        assert_eq!(reply.status, 413, "{body_mode}: {reply:?}");
    }
}

/// Envoy's failure mode when kvroute is gone. Fail-closed rejects with 500. Fail-open
/// serves from the fallback route, but only where Envoy still holds the body: in BUFFERED
/// mode, or for body-less requests. In FULL_DUPLEX_STREAMED mode Envoy has already handed
/// the body to the processor, so it cannot fail open and answers 500 (Envoy's behaviour,
/// asserted here so a change in it is noticed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_failure_mode_holds_when_kvroute_is_down() {
    let dir = scratch("failure-mode");
    let backends = Backends::start(2, Duration::ZERO).await;
    let mut kvroute = Kvroute::start(&dir, &backends.list(), &[]).await;
    let envoy = async |request_body_mode, fail_open| {
        Envoy::start(
            &dir,
            &EnvoyOptions {
                request_body_mode,
                response_body_mode: "FULL_DUPLEX_STREAMED",
                fail_open,
                grpc_port: kvroute.grpc_port,
                more_grpc_ports: &[],
                pool: &backends.addrs,
            },
        )
        .await
    };
    let open_buffered = envoy("BUFFERED", true).await;
    let open_duplex = envoy("FULL_DUPLEX_STREAMED", true).await;
    let closed = envoy("FULL_DUPLEX_STREAMED", false).await;
    let body = br#"{"model":"m","prompt":"hello"}"#;
    for envoy in [&open_buffered, &open_duplex, &closed] {
        let reply = http(envoy.port, "POST", "/v1/completions", &[], body.to_vec()).await;
        assert_eq!(reply.status, 200, "kvroute up: {reply:?}");
        assert_eq!(
            reply.header("x-served-by"),
            reply.header("x-destination-seen")
        );
    }

    kvroute.terminate();
    assert_eq!(kvroute.wait_exit(Duration::from_secs(10)).await, Some(true));

    let served = |reply: &Reply| {
        backends
            .addrs
            .iter()
            .any(|a| a.to_string() == reply.header("x-served-by"))
    };
    for _ in 0..3 {
        let reply = http(
            open_buffered.port,
            "POST",
            "/v1/completions",
            &[],
            body.to_vec(),
        )
        .await;
        assert_eq!(reply.status, 200, "fail-open serves: {reply:?}");
        assert!(served(&reply), "{reply:?}");
        assert_eq!(reply.header("x-destination-seen"), "", "nobody chose");
        assert_eq!(reply.header("x-body-hash"), body_hash(body));

        let reply = http(open_duplex.port, "GET", "/v1/models", &[], Vec::new()).await;
        assert_eq!(
            reply.status, 200,
            "fail-open serves body-less requests: {reply:?}"
        );
        assert!(served(&reply), "{reply:?}");
        let reply = http(
            open_duplex.port,
            "POST",
            "/v1/completions",
            &[],
            body.to_vec(),
        )
        .await;
        assert_eq!(
            reply.status, 500,
            "full-duplex bodies cannot fail open: {reply:?}"
        );

        for (method, payload) in [("POST", body.to_vec()), ("GET", Vec::new())] {
            let reply = http(closed.port, method, "/v1/completions", &[], payload).await;
            assert_eq!(reply.status, 500, "fail-closed rejects: {reply:?}");
            assert!(!served(&reply));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_streams() {
    let dir = scratch("drain");
    let backends = Backends::start(1, Duration::from_millis(1500)).await;
    let mut kvroute =
        Kvroute::start(&dir, &backends.list(), &["--shutdown-grace-secs", "20"]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let port = envoy.port;
    let slow = tokio::spawn(async move {
        let body = br#"{"model":"m","stream":true,"prompt":"hello"}"#;
        http(port, "POST", "/v1/completions", &[], body.to_vec()).await
    });
    let started = eventually(Duration::from_secs(5), async || {
        kvroute
            .metrics()
            .await
            .contains(r#"kvroute_requests_total{outcome="routed"} 1"#)
    })
    .await;
    assert!(started);
    kvroute.terminate();
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.text().contains("data: [DONE]"),
        "stream cut: {}",
        reply.text()
    );
    assert_eq!(
        kvroute.wait_exit(Duration::from_secs(15)).await,
        Some(true),
        "{}",
        kvroute.log_text()
    );
    assert!(
        kvroute.log_text().contains("drained"),
        "{}",
        kvroute.log_text()
    );
}

/// After SIGTERM kvroute is a lame duck for `--lame-duck`: readiness and gRPC health say
/// NOT_SERVING at once, so the data plane stops sending, but requests that still come are
/// routed (fail-closed Envoy would answer them 500 were the listener closed); then it drains
/// and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_starts_a_lame_duck_period_that_still_routes() {
    let dir = scratch("lame-duck");
    let backends = Backends::start(1, Duration::ZERO).await;
    let mut kvroute = Kvroute::start(&dir, &backends.list(), &["--lame-duck", "3s"]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let body = br#"{"model":"m","prompt":"hello"}"#;
    let reply = http(envoy.port, "POST", "/v1/completions", &[], body.to_vec()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let signalled = std::time::Instant::now();
    kvroute.terminate();
    let not_ready = eventually(Duration::from_secs(2), async || {
        http(kvroute.admin_port, "GET", "/readyz", &[], Vec::new())
            .await
            .status
            == 503
    })
    .await;
    assert!(not_ready, "readiness goes at once: {}", kvroute.log_text());
    let mut routed = 0;
    while signalled.elapsed() < Duration::from_millis(2_000) {
        let reply = http(envoy.port, "POST", "/v1/completions", &[], body.to_vec()).await;
        assert_eq!(
            reply.status, 200,
            "still routing in the lame duck period: {reply:?}"
        );
        assert_eq!(
            reply.header("x-served-by"),
            reply.header("x-destination-seen")
        );
        routed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(routed > 5, "{routed}");
    assert_eq!(
        kvroute.wait_exit(Duration::from_secs(10)).await,
        Some(true),
        "{}",
        kvroute.log_text()
    );
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "exited before the lame duck period ended"
    );
}

/// With the default policy, requests that share a long system prompt keep going to the
/// endpoint that served the first of them (its prefix cache), and different prompts spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_stick_to_one_endpoint_through_envoy() {
    let dir = scratch("prefix");
    let backends = Backends::start(3, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &[]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let tenants: Vec<String> = (0..4)
        .map(|t| format!("You are the assistant of tenant {t}. Policies follow. ").repeat(30))
        .collect();
    let mut homes: Vec<HashSet<String>> = vec![HashSet::new(); tenants.len()];
    for round in 0..4 {
        for (t, system) in tenants.iter().enumerate() {
            let question = format!("question {round}");
            homes[t].insert(chat_served_by(envoy.port, system, &question).await);
        }
    }
    for (t, h) in homes.iter().enumerate() {
        assert_eq!(h.len(), 1, "tenant {t} moved between endpoints: {h:?}");
    }
    let distinct: HashSet<_> = homes.iter().flatten().collect();
    assert!(distinct.len() >= 2, "tenants should spread: {distinct:?}");
}

#[test]
fn the_shipped_envoy_config_is_valid() {
    let out = std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(shipped_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With a routing profile that reads no body (`--policy least-in-flight`), every request is
/// routed at its headers and its body reaches the pod unchanged, whatever the body modes:
/// echoed in full-duplex mode; let through in buffered mode (where Envoy is also asked not
/// to send the body, when the response body is not full-duplex); and with the response body
/// not sent at all, the request still ends when its response does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_that_reads_no_body_lets_every_body_through() {
    let dir = scratch("no-body");
    let backends = Backends::start(2, Duration::from_millis(20)).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--policy", "least-in-flight"]).await;
    let modes = [
        ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED"),
        ("BUFFERED", "FULL_DUPLEX_STREAMED"),
        ("BUFFERED", "STREAMED"),
        ("BUFFERED", "NONE"),
    ];
    let mut sent = 0;
    for (request_body_mode, response_body_mode) in modes {
        let envoy = Envoy::start(
            &dir,
            &EnvoyOptions::modes(
                request_body_mode,
                response_body_mode,
                kvroute.grpc_port,
                &backends.addrs,
            ),
        )
        .await;
        for (path, body, stream) in workload(8) {
            let hash = body_hash(&body);
            let reply = http(envoy.port, "POST", path, &[], body).await;
            let modes = format!("{request_body_mode}/{response_body_mode}");
            assert_eq!(reply.status, 200, "{modes}: {reply:?}");
            assert_eq!(reply.header("x-body-hash"), hash, "{modes}: body changed");
            assert_eq!(
                reply.header("x-served-by"),
                reply.header("x-destination-seen"),
                "{modes}"
            );
            if stream {
                assert!(reply.text().contains("data: [DONE]"), "{modes}");
            }
            sent += 1;
        }
    }
    let settled = eventually(Duration::from_secs(5), async || {
        let m = kvroute.metrics().await;
        m.contains(&format!(
            r#"kvroute_requests_total{{outcome="routed_by_load"}} {sent}"#
        )) && !m
            .lines()
            .any(|l| l.starts_with("kvroute_endpoint_in_flight_requests{") && !l.ends_with(" 0"))
    })
    .await;
    let m = kvroute.metrics().await;
    assert!(
        settled,
        "every request routed at its headers and ended: {m}"
    );
    assert!(
        !m.contains(r#"outcome="routed"}"#),
        "no body was parsed: {m}"
    );
}
