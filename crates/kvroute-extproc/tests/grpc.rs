//! The ext_proc service over a real gRPC socket (tonic client and server in process): the
//! answers arrive in order, a protocol violation ends the stream with INVALID_ARGUMENT and
//! is counted, and a stream the client drops gives its endpoint slot back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use kvroute_endpoints::Registry;
use prometheus_client::encoding::text::encode;
use test_support::chat_body;
use test_support::envoy::*;
use tonic::Code;

mod common;

use common::serve;

fn metrics(prom: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    encode(&mut out, prom).unwrap();
    out
}

fn in_flight(r: &Registry) -> usize {
    r.snapshot().iter().map(|e| e.in_flight()).sum()
}

#[tokio::test]
async fn a_full_duplex_request_is_answered_over_grpc() {
    let mut s = serve(&[8001, 8002], None).await;
    let body = chat_body(100_000);
    let (tx, mut answers) = s.open().await;
    tx.send(with_config(
        request_headers("POST", "/v1/chat/completions", &[], false),
        protocol_config(
            BodySendMode::FullDuplexStreamed,
            BodySendMode::FullDuplexStreamed,
            false,
        ),
    ))
    .await
    .unwrap();
    tx.send(request_body(&body[..50_000], false)).await.unwrap();
    tx.send(request_body(&body[50_000..], true)).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(kind(&first), "request_headers");
    assert!(set_header(&first, "x-gateway-destination-endpoint").is_some());
    let mut rest = Vec::new();
    while rest.len() < 2 {
        rest.push(answers.message().await.unwrap().unwrap());
    }
    assert_eq!(streamed_body(&rest), (body, true));
    assert_eq!(in_flight(&s.registry), 1);

    // The client goes away mid-response: the slot comes back.
    tx.send(response_headers(200, "text/event-stream", false))
        .await
        .unwrap();
    assert_eq!(
        kind(&answers.message().await.unwrap().unwrap()),
        "response_headers"
    );
    drop(tx);
    drop(answers);
    let mut released = false;
    for _ in 0..100 {
        if in_flight(&s.registry) == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released, "slot still held after the stream ended");
}

#[tokio::test]
async fn a_protocol_violation_ends_the_stream_with_invalid_argument() {
    let mut s = serve(&[8001, 8002], None).await;
    let (tx, mut answers) = s.open().await;
    tx.send(request_body(b"{}", true)).await.unwrap();
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("out of order"), "{status}");
    assert!(
        metrics(&s.prom).contains("kvroute_extproc_stream_errors_total 1"),
        "{}",
        metrics(&s.prom)
    );
}
