//! A hostile or broken peer on a pod's KV-event port. It greets as a ZMQ publisher, then
//! announces a 1 TiB frame. The `zeromq` crate reserves whatever a frame header announces,
//! so without the relay kvroute aborted ("memory allocation of 1099511693321 bytes
//! failed"). With it the connection is cut, counted, and retried, and kvroute lives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kvroute_core::Endpoint;
use kvroute_endpoints::Registry;
use kvroute_events::{EventMetrics, SubscriberConfig, Subscriptions};
use kvroute_index::{PrefixIndex, Shared};
use test_support::http::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// ZMTP 3.0's greeting for the NULL mechanism, as a publisher sends it.
fn greeting() -> Vec<u8> {
    let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    g.extend(mechanism);
    g.push(0);
    g.resize(64, 0);
    g
}

#[tokio::test]
async fn a_peer_announcing_a_huge_frame_is_cut_and_kvroute_lives() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let (mut peer, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut frame = greeting();
                frame.push(0b10);
                frame.extend_from_slice(&(1u64 << 40).to_be_bytes());
                let _ = peer.write_all(&frame).await;
                let mut sink = [0u8; 256];
                while matches!(peer.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });

    let registry = Arc::new(Registry::new());
    registry.replace(vec![Endpoint::from_address(([127, 0, 0, 1], 1).into())]);
    let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
    let metrics = EventMetrics::register(&mut prom);
    let config = SubscriberConfig {
        port,
        ..SubscriberConfig::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Subscriptions::new(config, Arc::new(Shared::new(PrefixIndex::new())), metrics)
            .run(Arc::clone(&registry), stop.clone()),
    );
    let text = || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &prom).unwrap();
        out
    };
    let cut = eventually(Duration::from_secs(10), async || {
        text().contains("kvroute_kv_event_oversized_frames_total 1")
    })
    .await;
    assert!(cut, "{}", text());
    assert!(connections.load(Ordering::Relaxed) >= 1);
    assert!(
        !registry.snapshot()[0].events_confirmed(),
        "nothing from that peer is trusted"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
