//! Soak: real Envoy → the real `kvroute serve --pool-name` (TLS, KV events, discovery
//! through the in-process API server) → simulated vLLM pods, driven as fast as a closed loop
//! of clients goes, while pods come and go: one is replaced every few seconds (not ready,
//! deleted, stopped a second later; a new one started and made Ready). Reports requests,
//! errors (must be none), decision p50/p99 and kvroute's memory after the warm-up and at the
//! end (must stay flat).
//!
//! CI runs it for 20 s; `KVROUTE_SOAK_SECS=1800 cargo test --release --test soak --
//! --nocapture` is the 30-minute run (not through nextest, whose slow-test limit in
//! `.config/nextest.toml` ends a test after 3 minutes; figures: docs/benchmarks.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use kvroute_sim::server::Bound;
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use tokio_util::sync::CancellationToken;

const NS: &str = "llm";
/// Loopback addresses the pods take in turn (127.0.0.2 …): more than are ever up at once,
/// so an address is reused only well after its last pod stopped.
const ADDRESSES: u8 = 12;
const PODS: usize = 4;

struct Pod {
    name: String,
    ip: u8,
    bound: Bound,
    stop: CancellationToken,
}

async fn start_pod(api: &ApiServer, n: usize, ip: u8, port: u16, events: u16) -> Pod {
    let stop = CancellationToken::new();
    let bound = sim_pod_at(ip, port, events, 50.0, stop.clone()).await;
    let name = format!("vllm-{n}");
    api.apply(
        &Resource::pods(),
        pod(
            NS,
            &name,
            &format!("127.0.0.{ip}"),
            &[("app", "vllm")],
            true,
        ),
    );
    Pod {
        name,
        ip,
        bound,
        stop,
    }
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `q` quantile of a histogram in Prometheus text (upper bound of its bucket), seconds.
fn quantile(metrics: &str, name: &str, q: f64) -> f64 {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_without_error_and_memory_stays_flat_while_pods_churn() {
    let secs: u64 = std::env::var("KVROUTE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let duration = Duration::from_secs(secs);
    let dir = scratch("soak");
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    let (port, events) = (free_port(), free_port());
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[port]),
    );
    let mut next = 0usize;
    let mut pods: VecDeque<Pod> = VecDeque::new();
    for _ in 0..PODS {
        let ip = 2 + u8::try_from(next % usize::from(ADDRESSES)).unwrap();
        pods.push_back(start_pod(&api, next, ip, port, events).await);
        next += 1;
    }
    let kvroute = Kvroute::for_pool(
        &dir,
        &api,
        NS,
        &[
            "--kv-events-port",
            &events.to_string(),
            // Not a line per request (the harness's default): the start-up line is enough.
            "--log",
            "warn,kvroute::serve=info",
        ],
    )
    .await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.bound.http).collect();
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;

    let traffic = Traffic::start(envoy.port, 16, "soak");
    let started = Instant::now();
    let warm_up = (duration / 10).max(Duration::from_secs(3));
    let churn_every = Duration::from_secs(3);
    let mut rss_after_warm_up = None;
    let mut stopping: VecDeque<(Instant, Pod)> = VecDeque::new();
    let mut replaced = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(churn_every).await;
        if rss_after_warm_up.is_none() && started.elapsed() >= warm_up {
            rss_after_warm_up = Some(rss_kib(kvroute.pid()));
        }
        // The oldest pod goes: not ready, then deleted; its process gets a second to finish
        // what it holds, as a pod's grace period would.
        let old = pods.pop_front().unwrap();
        api.apply(
            &Resource::pods(),
            pod(
                NS,
                &old.name,
                &format!("127.0.0.{}", old.ip),
                &[("app", "vllm")],
                false,
            ),
        );
        api.delete(&Resource::pods(), NS, &old.name);
        stopping.push_back((Instant::now(), old));
        while stopping
            .front()
            .is_some_and(|(at, _)| at.elapsed() >= Duration::from_secs(1))
        {
            stopping.pop_front().unwrap().1.stop.cancel();
        }
        let ip = 2 + u8::try_from(next % usize::from(ADDRESSES)).unwrap();
        pods.push_back(start_pod(&api, next, ip, port, events).await);
        next += 1;
        replaced += 1;
    }
    let rss_end = rss_kib(kvroute.pid());
    let (sent, answers) = traffic.stop().await;
    let elapsed = started.elapsed();
    let metrics = kvroute.metrics().await;
    let failed: Vec<&Sent> = answers.iter().filter(|s| s.status != Some(200)).collect();
    let p50 = quantile(&metrics, "kvroute_decision_duration_seconds", 0.5);
    let p99 = quantile(&metrics, "kvroute_decision_duration_seconds", 0.99);
    let rss_start = rss_after_warm_up.unwrap_or(rss_end);
    println!(
        "soak {elapsed:.0?}: {sent} requests ({:.0}/s), {} failed, {replaced} pods replaced; decision p50 ≤ {:.0} µs, p99 ≤ {:.0} µs; kvroute RSS {:.1} MiB after the warm-up, {:.1} MiB at the end",
        sent as f64 / elapsed.as_secs_f64(),
        failed.len(),
        p50 * 1e6,
        p99 * 1e6,
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0,
    );
    assert_eq!(answers.len(), sent, "every request came back");
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(replaced >= 3, "the pool churned");
    // Flat: what grows with time (departed endpoints' state, series, index entries) would
    // show here; a fixed slack absorbs the allocator's noise on a short run.
    assert!(
        rss_end <= rss_start + (rss_start / 4).max(16 * 1024),
        "kvroute grew from {rss_start} KiB to {rss_end} KiB"
    );
    // The last pod started just now: wait for discovery to settle, then exactly the pods
    // up have series (a departed pod's would linger here).
    let want: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "kvroute_endpoint_in_flight_requests{{endpoint=\"{}\"}}",
                p.name
            )
        })
        .collect();
    let mut last = String::new();
    let settled = eventually(Duration::from_secs(10), async || {
        last = kvroute.metrics().await;
        let series: Vec<&str> = last
            .lines()
            .filter(|l| l.starts_with("kvroute_endpoint_in_flight_requests{"))
            .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k))
            .collect();
        series.len() == PODS && want.iter().all(|w| series.contains(&w.as_str()))
    })
    .await;
    assert!(
        settled,
        "series for departed pods remain, or a new pod has none: {last}"
    );
    for (_, p) in stopping {
        p.stop.cancel();
    }
    for p in pods {
        p.stop.cancel();
    }
}
