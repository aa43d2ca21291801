//! kvroute killed and restarted under load. Real Envoy in BUFFERED mode with fail-open
//! carries every request while kvroute is gone (to the pool's fallback route). The restarted
//! process knows nothing it did not read again: it rebuilds the precise index from the pods'
//! replay sockets, and routes the next request with a prefix cached before the restart to
//! the pod that holds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvroute_restarted_under_load_rebuilds_from_replay_and_loses_nothing() {
    let dir = scratch("restart");
    let stop = CancellationToken::new();
    let pods = two_pods(&stop, None, None).await;
    let list = format!("{},{}", pods[0].http, pods[1].http);
    let grpc = format!("127.0.0.1:{}", free_port());
    let args = [
        "--grpc-addr",
        grpc.as_str(),
        "--kv-events-port",
        &pods[0].events.port().to_string(),
        "--kv-replay-port",
        &pods[0].replay.port().to_string(),
        "--kv-events-topic",
        "kv@",
        "--block-size",
        "16",
        "--lame-duck",
        "0s",
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Kvroute::start(&dir, &list, &args).await;
    let addrs = [pods[0].http, pods[1].http];
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions {
            request_body_mode: "BUFFERED",
            response_body_mode: "STREAMED",
            fail_open: true,
            grpc_port: first.grpc_port,
            more_grpc_ports: &[],
            pool: &addrs,
        },
    )
    .await;

    // 256 tokens cached on pod 1 behind kvroute's back; the first process sees them stored.
    let document: Vec<u32> = (70_000..70_256).collect();
    let direct = test_support::http::request(
        pods[1].http,
        "POST",
        "/v1/completions",
        &[],
        completion(&document),
    )
    .await;
    assert_eq!(direct.status, 200);
    assert!(
        eventually(Duration::from_secs(10), async || stored_blocks(&first)
            .await
            >= 16.0)
        .await
    );

    let traffic = Traffic::start(envoy.port, 4, "restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Killed outright (no lame duck, no drain), then started again on the same port.
    first.kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let second = Kvroute::start(&dir, &list, &args).await;
    let back = eventually(Duration::from_secs(10), async || {
        stored_blocks(&second).await >= 16.0
    })
    .await;
    assert!(
        back,
        "the index was not rebuilt from replay: {}",
        second.metrics().await
    );
    // Blocks stored from one pod's replay do not say the other's is done: its entries count
    // only once its stream is confirmed in sequence.
    let confirmed = eventually(Duration::from_secs(10), async || {
        second
            .metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("kvroute_endpoint_kv_events_confirmed{") && l.ends_with(" 1"))
            .count()
            == pods.len()
    })
    .await;
    assert!(
        confirmed,
        "a pod's KV events were not confirmed: {}",
        second.metrics().await
    );
    // Envoy's health check takes the new process back within a few seconds.
    let routed_again = eventually(Duration::from_secs(15), async || {
        second
            .metrics()
            .await
            .contains("kvroute_requests_total{outcome=\"routed\"}")
    })
    .await;
    assert!(routed_again, "{}", second.log_text());
    let routing_again = killed_at.elapsed();

    let (sent, answers) = traffic.stop().await;
    let failed: Vec<&Sent> = answers.iter().filter(|s| s.status != Some(200)).collect();
    println!(
        "{sent} requests around a kill and a restart ({routing_again:?} from the kill to the new process routing); {} failed",
        failed.len()
    );
    assert_eq!(answers.len(), sent);
    assert!(
        failed.is_empty(),
        "lost while kvroute restarted: {failed:?}"
    );

    // The document with a question, through Envoy: the new process sends it to pod 1, from
    // what it read again, and pod 1's cache serves the document.
    let hits_before = pod_counter(&pods[1], "vllm:prefix_cache_hits_total").await;
    let mut asked = document.clone();
    asked.extend(70_900..70_920);
    let reply = http(
        envoy.port,
        "POST",
        "/v1/completions",
        &[],
        completion(&asked),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let hits = pod_counter(&pods[1], "vllm:prefix_cache_hits_total").await;
    assert_eq!(
        hits - hits_before,
        256.0,
        "the prefix cached before the restart was not found: {}",
        second.log_text()
    );
    stop.cancel();
}
