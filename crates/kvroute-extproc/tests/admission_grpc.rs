//! Flow control over a real gRPC socket: a request's headers are held while the pool is
//! saturated, the body Envoy keeps sending waits with them, and the request is routed whole
//! once the pool has room; a stream the client drops while waiting leaves the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_endpoints::PodLoad;
use kvroute_extproc::{Admission, AdmissionCollector};
use kvroute_scheduler::admission::{AdmissionSettings, FlowSettings};
use prometheus_client::encoding::text::encode;
use test_support::chat_body;
use test_support::envoy::*;

mod common;

use common::{Served, serve};

/// A server over one endpoint with flow control on, its dispatcher running.
async fn serve_flow() -> Served {
    serve(
        &[8001],
        Some(&|registry, prom| {
            let admission = Admission::new(
                Arc::clone(registry),
                None,
                AdmissionSettings {
                    flow: Some(FlowSettings::default()),
                    ..AdmissionSettings::default()
                },
            );
            prom.register_collector(Box::new(AdmissionCollector(Arc::clone(&admission))));
            admission
        }),
    )
    .await
}

/// Queue size and scrapes, read and made for these tests.
trait Flow {
    fn waiting(&self) -> String;
    fn scraped(&self, waiting: u32);
}

impl Flow for Served {
    fn waiting(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.prom).unwrap();
        out.lines()
            .find(|l| l.starts_with("kvroute_flow_control_queue_size{"))
            .unwrap_or("")
            .to_owned()
    }

    /// Records a scrape of every endpoint, now, with `waiting` requests queued.
    fn scraped(&self, waiting: u32) {
        for e in self.registry.snapshot().iter() {
            let load = PodLoad {
                waiting,
                ..PodLoad::default()
            };
            e.record_scrape(load, Instant::now());
        }
    }
}

async fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_held_request_is_routed_whole_once_the_pool_has_room() {
    let mut s = serve_flow().await;
    // Never scraped: saturated.
    let (tx, mut answers) = s.open().await;
    let body = chat_body(2_000);
    tx.send(full_duplex_chat_headers()).await.unwrap();
    tx.send(request_body(&body, true)).await.unwrap();
    let held = tokio::time::timeout(Duration::from_millis(300), answers.message()).await;
    assert!(held.is_err(), "answered while saturated: {held:?}");
    assert!(s.waiting().ends_with(" 1"), "{}", s.waiting());
    s.scraped(0);
    let first = answers.message().await.unwrap().unwrap();
    assert!(
        set_header(&first, "x-gateway-destination-endpoint").is_some(),
        "{first:?}"
    );
    let rest = answers.message().await.unwrap().unwrap();
    assert_eq!(streamed_body(&[rest]), (body, true));
    assert_eq!(s.waiting(), "", "the queue is empty");
}

#[tokio::test]
async fn a_client_gone_while_waiting_leaves_the_queue() {
    let mut s = serve_flow().await;
    let (tx, answers) = s.open().await;
    tx.send(full_duplex_chat_headers()).await.unwrap();
    assert!(
        eventually(|| s.waiting().ends_with(" 1")).await,
        "not queued"
    );
    drop((tx, answers));
    assert!(
        eventually(|| s.waiting().is_empty()).await,
        "still queued: {}",
        s.waiting()
    );
    // Once the pool has room a new request goes at once.
    s.scraped(0);
    let (tx, mut answers) = s.open().await;
    tx.send(full_duplex_chat_headers()).await.unwrap();
    tx.send(request_body(&chat_body(500), true)).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(set_header(&first, "x-gateway-destination-endpoint").is_some());
}
