//! A hostile or broken peer on a pod's KV-event port. It greets as a ZMQ publisher, then
//! announces a 1 TiB frame. The `zeromq` crate reserves whatever a frame header announces,
//! so without the relay kvroute aborted ("memory allocation of 1099511693321 bytes
//! failed"). With it the connection is cut, counted, and retried, and kvroute lives.
//! Within the frame limit, a publisher sending batches that decode into millions of
//! entries, or a replay socket that never ends its replay, is held to the batch and replay
//! limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvroute_core::Endpoint;
use kvroute_endpoints::Registry;
use kvroute_events::{EventMetrics, SubscriberConfig, Subscriptions};
use kvroute_index::{PrefixIndex, Shared};
use test_support::http::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

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

/// kvroute's subscriptions following one endpoint on 127.0.0.1 with `config`.
struct Following {
    registry: Arc<Registry>,
    prom: prometheus_client::registry::Registry,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Following {
    fn start(config: SubscriberConfig) -> Self {
        let registry = Arc::new(Registry::new());
        registry.replace(vec![Endpoint::from_address(([127, 0, 0, 1], 1).into())]);
        let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
        let metrics = EventMetrics::register(&mut prom);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Subscriptions::new(config, Arc::new(Shared::new(PrefixIndex::new())), metrics)
                .run(Arc::clone(&registry), stop.clone()),
        );
        Self {
            registry,
            prom,
            stop,
            task,
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom).unwrap();
        out
    }

    /// Stops following; the task must end promptly.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
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

    let f = Following::start(SubscriberConfig {
        port,
        ..SubscriberConfig::default()
    });
    let cut = eventually(Duration::from_secs(10), async || {
        f.text()
            .contains("kvroute_kv_event_oversized_frames_total 1")
    })
    .await;
    assert!(cut, "{}", f.text());
    assert!(connections.load(Ordering::Relaxed) >= 1);
    assert!(
        !f.registry.snapshot()[0].events_confirmed(),
        "nothing from that peer is trusted"
    );
    f.stop().await;
}

/// `[0, [["BlockRemoved", [1, 1, …]]]]` with `hashes` one-byte hashes: one byte each on the
/// wire, eight decoded.
fn removing(hashes: u32) -> Bytes {
    let mut b = vec![0x92, 0x00, 0x91, 0x92, 0xac];
    b.extend_from_slice(b"BlockRemoved");
    b.push(0xdd);
    b.extend(hashes.to_be_bytes());
    b.resize(b.len() + hashes as usize, 0x01);
    Bytes::from(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_and_endless_replays_are_refused_and_counted() {
    let mut publisher = zeromq::PubSocket::new();
    let events_at = publisher.bind("tcp://127.0.0.1:0").await.unwrap();
    let mut router = zeromq::RouterSocket::new();
    let replay_at = router.bind("tcp://127.0.0.1:0").await.unwrap();
    let port_of = |e: &zeromq::Endpoint| match e {
        zeromq::Endpoint::Tcp(_, port) => *port,
        other => panic!("{other:?}"),
    };
    let (port, replay_port) = (port_of(&events_at), port_of(&replay_at));
    // Each replay request is answered with batches of 64 KiB that never end.
    let replays = Arc::new(AtomicUsize::new(0));
    let asked = Arc::clone(&replays);
    let peer = CancellationToken::new();
    let hostile = peer.clone();
    tokio::spawn(async move {
        let mut seq = 0u64;
        'requests: loop {
            let request = tokio::select! {
                () = hostile.cancelled() => break,
                m = router.recv() => m.unwrap().into_vec(),
            };
            asked.fetch_add(1, Ordering::Relaxed);
            loop {
                seq += 1;
                let m = || {
                    ZmqMessage::try_from(vec![
                        request[0].clone(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&seq.to_be_bytes()),
                        removing(64 << 10),
                    ])
                    .unwrap()
                };
                // The socket refuses while its queue to the client is full: retry for a
                // while, then take the client for gone.
                let mut tries = 0;
                while router.send(m()).await.is_err() {
                    tries += 1;
                    if tries > 200 || hostile.is_cancelled() {
                        continue 'requests;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if hostile.is_cancelled() {
                    break 'requests;
                }
                // A flood, but one that lets the other tasks on this runtime run.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });

    let f = Following::start(SubscriberConfig {
        port,
        replay_port: Some(replay_port),
        max_batch_entries: 1 << 10,
        max_replay_bytes: 1 << 20,
        replay_timeout: Duration::from_secs(30),
        ..SubscriberConfig::default()
    });
    // The replay asked on connecting stops at 1 MiB, not at the 30 s timeout.
    let abandoned = eventually(Duration::from_secs(10), async || {
        f.text()
            .contains("kvroute_kv_event_oversized_replays_total 1")
    })
    .await;
    assert!(
        abandoned,
        "{} replays asked; {}",
        replays.load(Ordering::Relaxed),
        f.text()
    );
    assert!(replays.load(Ordering::Relaxed) >= 1);
    // Live batches of 2,048 entries against a limit of 1,024: refused and counted, the
    // endpoint's entries dropped each time.
    let refused = eventually(Duration::from_secs(10), async || {
        let m = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&1u64.to_be_bytes()),
            removing(2048),
        ])
        .unwrap();
        publisher.send(m).await.unwrap();
        let t = f.text();
        t.contains("kvroute_kv_event_batches_total{outcome=\"oversized\"}")
            && t.contains("kvroute_kv_event_resyncs_total{cause=\"oversized\"}")
    })
    .await;
    assert!(refused, "{}", f.text());
    peer.cancel();
    f.stop().await;
}
