//! kvroute's gRPC port under stream floods, through a raw HTTP/2 client. A burst of ext_proc
//! streams that Envoy resets before kvroute has accepted them (a wave of clients
//! disconnecting at once: 150 in the router-cost benchmark) must not close the HTTP/2
//! connection they share: h2's default allows 20 such resets per connection, then closes it,
//! and every other request on that connection fails (Envoy answers 500). And no more than
//! `--max-streams` streams are open at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingResponse, processing_response};
use harness::*;
use prost::Message;
use tokio::net::TcpStream;

const PROCESS: &str = "http://kvroute/envoy.service.ext_proc.v3.ExternalProcessor/Process";

fn grpc_request() -> tonic::codegen::http::Request<()> {
    tonic::codegen::http::Request::post(PROCESS)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// One gRPC message frame: uncompressed, length, bytes.
fn frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// A whole request on `client`: a GET answered by load. `None` when the stream is refused.
async fn routes_a_get(client: &mut h2::client::SendRequest<Bytes>) -> Option<ProcessingResponse> {
    let (response, mut send) = client.send_request(grpc_request(), false).unwrap();
    let headers = test_support::envoy::request_headers("GET", "/v1/models", &[], true);
    // A refused stream may already be closed by kvroute's answer (trailers only) before its
    // data goes out: the answer below says so.
    let _ = send.send_data(frame(&headers), true);
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer in time")
        .expect("the connection is up");
    assert_eq!(response.status(), 200);
    if let Some(status) = response.headers().get("grpc-status") {
        assert_eq!(status, "8", "refused as RESOURCE_EXHAUSTED");
        return None;
    }
    let mut body = response.into_body();
    let data = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .unwrap()?
        .unwrap();
    Some(ProcessingResponse::decode(&data[5..]).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_streams_are_open_at_once() {
    let dir = scratch("max-streams");
    let backends = Backends::start(1, Duration::ZERO).await;
    // A plaintext HTTP/2 client: TLS is not what this test is about.
    let kvroute = Kvroute::start(
        &dir,
        &backends.list(),
        &["--max-streams", "1", "--secure-serving=false"],
    )
    .await;
    let tcp = TcpStream::connect(("127.0.0.1", kvroute.grpc_port))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // One stream stays open: its body never comes. Its response headers say it was taken
    // (a refused stream's carry its grpc-status at once).
    let (open, mut holding) = client.send_request(grpc_request(), false).unwrap();
    let headers = test_support::envoy::request_headers("POST", "/v1/completions", &[], false);
    holding.send_data(frame(&headers), false).unwrap();
    let open = tokio::time::timeout(Duration::from_secs(5), open)
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(open.headers().get("grpc-status").is_none(), "{open:?}");
    assert!(
        routes_a_get(&mut client).await.is_none(),
        "a second stream is refused while one is open"
    );
    assert!(
        kvroute
            .metrics()
            .await
            .contains(r#"kvroute_requests_total{outcome="too_many_streams"}"#)
    );
    // When it ends, its place is free again.
    holding.send_reset(h2::Reason::CANCEL);
    let served = eventually(Duration::from_secs(5), async || {
        routes_a_get(&mut client).await.is_some()
    })
    .await;
    assert!(served, "{}", kvroute.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_before_acceptance_do_not_close_the_connection() {
    let dir = scratch("resets");
    let backends = Backends::start(1, Duration::ZERO).await;
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--secure-serving=false"]).await;
    let tcp = TcpStream::connect(("127.0.0.1", kvroute.grpc_port))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // Opened and reset at once, all written before kvroute reads any of them.
    for _ in 0..200 {
        let (_response, mut send) = client.send_request(grpc_request(), false).unwrap();
        send.send_reset(h2::Reason::CANCEL);
        client = client.ready().await.unwrap();
    }
    // The same connection still serves a whole request: a GET answered by load.
    let answer = routes_a_get(&mut client)
        .await
        .expect("the connection survived the resets");
    assert!(
        matches!(
            answer.response,
            Some(processing_response::Response::RequestHeaders(_))
        ),
        "{answer:?}"
    );
    assert!(!connection.is_finished());
}

/// A request whose body never comes (a client trickling it, or a data plane that stopped
/// sending) is given up after --stream-request-timeout: the stream ends DEADLINE_EXCEEDED,
/// counted, and its place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_unanswered_is_given_up_after_the_timeout() {
    let dir = scratch("request-timeout");
    let backends = Backends::start(1, Duration::ZERO).await;
    let kvroute = Kvroute::start(
        &dir,
        &backends.list(),
        &[
            "--secure-serving=false",
            "--stream-request-timeout",
            "500ms",
            "--max-streams",
            "1",
        ],
    )
    .await;
    let tcp = TcpStream::connect(("127.0.0.1", kvroute.grpc_port))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // Full-duplex chat headers announce a body, which never follows.
    let (response, mut send) = client.send_request(grpc_request(), false).unwrap();
    send.send_data(
        frame(&test_support::envoy::full_duplex_chat_headers()),
        false,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer in time")
        .unwrap();
    let mut body = response.into_body();
    let trailers = tokio::time::timeout(Duration::from_secs(5), async {
        while body.data().await.is_some() {}
        body.trailers().await
    })
    .await
    .expect("the stream ends in time")
    .unwrap()
    .expect("a gRPC status");
    assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(
        kvroute
            .metrics()
            .await
            .contains(r#"kvroute_requests_total{outcome="request_timeout"} 1"#)
    );
    // Its place (--max-streams 1) is free again.
    assert!(routes_a_get(&mut client).await.is_some());
}
