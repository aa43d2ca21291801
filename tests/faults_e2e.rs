//! Faults through real Envoy: bodies at the size limits and in pieces as small as HTTP
//! allows, and a pod that dies in the middle of an answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A completions body of about `len` bytes.
fn big_body(len: usize) -> Vec<u8> {
    let prompt = "lorem ipsum ".repeat(len / 12);
    serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1})
        .to_string()
        .into_bytes()
}

/// Sends `body` to Envoy as HTTP/1.1 chunked, one chunk per `piece` bytes, each chunk its
/// own write; returns the raw answer.
async fn send_in_pieces(port: u16, body: &[u8], piece: usize) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: kvroute\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // Many chunks per write call would let the kernel coalesce them anyway; keep the
    // writes small but not one syscall per byte (100k syscalls take seconds in a debug run).
    let mut out = Vec::with_capacity(64 * 1024);
    for chunk in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        if out.len() >= 4096 {
            tcp.write_all(&out).await.unwrap();
            out.clear();
        }
    }
    out.extend_from_slice(b"0\r\n\r\n");
    tcp.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_body_and_a_body_in_100k_pieces_arrive_whole() {
    let dir = scratch("bodies");
    let backends = Backends::start(2, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &[]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;

    // 10 MB, under the 16 MiB default limit: routed, and the backend gets every byte.
    let body = big_body(10_000_000);
    let hash = body_hash(&body);
    let reply = http(envoy.port, "POST", "/v1/completions", &[], body).await;
    assert_eq!(reply.status, 200, "{}", kvroute.log_text());
    assert_eq!(
        reply.header("x-body-hash"),
        hash,
        "the body changed on the way"
    );
    assert_eq!(
        reply.header("x-served-by"),
        reply.header("x-destination-seen")
    );

    // 100,000 pieces of one byte each.
    let body = big_body(100_000);
    let hash = body_hash(&body);
    let answer = send_in_pieces(envoy.port, &body, 1).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("x-body-hash: {hash}")),
        "the body changed on the way: {answer}"
    );
    let m = kvroute.metrics().await;
    assert!(
        m.contains(r#"kvroute_requests_total{outcome="routed"} 2"#),
        "{m}"
    );
}

/// A pod that dies while it streams an answer: the client's answer is cut (Envoy's doing),
/// kvroute gives the slot back, counts the failure, and the next requests go to the pod that
/// is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_mid_answer_gives_its_slot_back() {
    let dir = scratch("killed-mid-answer");
    let stop = CancellationToken::new();
    let doomed_stop = CancellationToken::new();
    let doomed = sim_pod(&doomed_stop).await;
    let survivor = sim_pod(&stop).await;
    let list = format!("{},{}", doomed.http, survivor.http);
    let kvroute = Kvroute::start(&dir, &list, &["--refresh-metrics-interval", "50ms"]).await;
    let addrs: Vec<SocketAddr> = vec![doomed.http, survivor.http];
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;

    // Long streamed answers on both pods (the picker spreads them).
    let mut long = Vec::new();
    for i in 0..6 {
        let port = envoy.port;
        long.push(tokio::spawn(async move {
            let body = serde_json::json!({
                "model": "m", "stream": true, "max_tokens": 4000,
                "messages": [{"role": "user", "content": format!("tell me a long story {i}")}],
            });
            test_support::http::try_request(
                SocketAddr::from(([127, 0, 0, 1], port)),
                "POST",
                "/v1/chat/completions",
                &[],
                body.to_string().into_bytes(),
            )
            .await
        }));
    }
    let busy = eventually(Duration::from_secs(10), async || {
        let m = kvroute.metrics().await;
        let key = format!(
            "kvroute_endpoint_in_flight_requests{{endpoint=\"{}\"}} ",
            doomed.http
        );
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .is_some_and(|n| n != "0")
    })
    .await;
    assert!(busy, "no answer in flight on the doomed pod");
    doomed_stop.cancel();
    for task in long {
        // Each either finished on the survivor or was cut; none hangs.
        let _ = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no answer hangs after its pod died");
    }
    let released =
        eventually(Duration::from_secs(10), async || {
            !kvroute.metrics().await.lines().any(|l| {
                l.starts_with("kvroute_endpoint_in_flight_requests{") && !l.ends_with(" 0")
            })
        })
        .await;
    assert!(
        released,
        "a slot is still held: {}",
        kvroute.metrics().await
    );
    // New requests: the dead pod refuses connections and fails; they succeed on the
    // survivor (Envoy answers the few that hit the dead pod 503): passive health scores it
    // down from its first failure and ejects it at the fifth, so no more than five fail.
    let mut ok = 0;
    for i in 0..30 {
        let body =
            serde_json::json!({"model": "m", "max_tokens": 2, "prompt": format!("after {i}")});
        let reply = http(
            envoy.port,
            "POST",
            "/v1/completions",
            &[],
            body.to_string().into_bytes(),
        )
        .await;
        if reply.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 25, "{ok} of 30 succeeded after the pod died");
    let m = kvroute.metrics().await;
    let ejected = sample(
        &m,
        &format!("kvroute_endpoint_ejected{{endpoint=\"{}\"}}", doomed.http),
    );
    let failed = sample(&m, "kvroute_responses_total{class=\"5xx\"}");
    assert!(
        ejected == 1.0 || failed <= 5.0,
        "the dead pod was neither ejected nor avoided: {m}"
    );
    stop.cancel();
}
