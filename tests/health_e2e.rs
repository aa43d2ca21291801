//! Passive health end to end: three simulated vLLM pods (their `/metrics` scraped every
//! 50 ms), the real `kvroute serve`, real Envoy in front, a steady stream of chat requests.
//! A pod that starts answering every request 500 is scored down from its first failure and
//! ejected at its fifth, and gets (almost) nothing meanwhile, though it answers at once and so
//! looks the least loaded; once it is healthy again it is taken back by itself (when its
//! ejection is over, or its failures are forgotten).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use kvroute_sim::server::Bound;
use tokio_util::sync::CancellationToken;

/// The first ejection's length (`HealthConfig::default`; `kvroute serve` has no flag for it).
const FIRST_EJECTION: Duration = Duration::from_secs(10);

/// Which pod each of `sent` went to, from Envoy's access log; `pods.len()` stands for an
/// answer with no upstream.
async fn pods_of(envoy: &Envoy, pods: &[Bound], sent: &[Sent]) -> Vec<usize> {
    envoy
        .upstreams_of(sent)
        .await
        .iter()
        .map(|up| {
            pods.iter()
                .position(|p| p.http.to_string() == *up)
                .unwrap_or(pods.len())
        })
        .collect()
}

fn per_pod(of: &[usize], n: usize) -> Vec<usize> {
    let mut counts = vec![0; n + 1];
    for &p in of {
        counts[p] += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pod_is_avoided_and_taken_back_when_it_recovers() {
    let dir = scratch("health");
    let stop = CancellationToken::new();
    let pods = sim_pods(3, &stop).await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let list = endpoint_list(&addrs);
    let kvroute = Kvroute::start(&dir, &list, &["--refresh-metrics-interval", "50ms"]).await;
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
    let bad = &pods[0];
    let ejected = |m: &str, v: u8| {
        m.contains(&format!(
            "kvroute_endpoint_ejected{{endpoint=\"{}\"}} {v}",
            bad.http
        ))
    };

    let traffic = Traffic::start(envoy.port, 4, "health");
    let begin = Instant::now();

    // Healthy: every pod gets its share.
    let warm = traffic
        .wait_answered_since(begin, 60, Duration::from_secs(20))
        .await;
    assert!(warm.iter().all(|s| s.status == Some(200)), "{warm:?}");
    let before = per_pod(&pods_of(&envoy, &pods, &warm).await, pods.len());
    println!("before the fault, requests per pod: {before:?}");
    assert!(
        before[..3].iter().all(|&n| n >= 6),
        "the stream should spread over all pods: {before:?}"
    );

    // Pod 0 answers every request 500, at once: scored down from its first failure, ejected
    // at the fifth if traffic still reaches it.
    set_fault(bad, "errors").await;
    let faulted = Instant::now();
    let mut m = String::new();
    let out = eventually(Duration::from_secs(3), async || {
        m = kvroute.metrics().await;
        ejected(&m, 1)
    })
    .await;
    let out_at = Instant::now();
    let failing = traffic.answered_since(faulted);
    let failing: Vec<Sent> = failing.into_iter().filter(|s| s.started < out_at).collect();
    let to_bad = pods_of(&envoy, &pods, &failing)
        .await
        .iter()
        .filter(|&&p| p == 0)
        .count();
    println!(
        "{} after the fault (ejected: {out}); meanwhile {} requests, {to_bad} of them to the failing pod",
        if out { "ejected" } else { "not ejected" },
        failing.len(),
    );
    assert!(
        to_bad <= 10,
        "{to_bad} requests went to the failing pod: {m}"
    );
    if out {
        assert!(
            m.contains(&format!(
                "kvroute_endpoint_ejections_total{{endpoint=\"{}\"}} 1",
                bad.http
            )),
            "{m}"
        );
    }

    // While it fails: the next 100 requests (almost) all go elsewhere, and succeed.
    let after = traffic
        .wait_answered_since(out_at, 100, Duration::from_secs(8))
        .await;
    let of = pods_of(&envoy, &pods, &after).await;
    let counts = per_pod(&of, pods.len());
    println!(
        "the 100 requests after that ({:?}), per pod: {counts:?}",
        after.last().unwrap().started - out_at
    );
    assert!(
        counts[0] <= 10,
        "the failing pod still got {} of 100 requests: {counts:?}",
        counts[0]
    );
    assert_eq!(counts[3], 0, "requests with no upstream: {counts:?}");
    for (s, p) in after.iter().zip(&of) {
        if *p != 0 {
            assert_eq!(s.status, Some(200), "{s:?}");
        }
    }
    let failed = after.iter().filter(|s| s.status != Some(200)).count();
    assert!(failed <= 10, "{failed} of 100 failed");

    // Healthy again: taken back by itself, once its ejection is over or its failures are
    // forgotten (10 s from them).
    set_fault(bad, "none").await;
    let healed = Instant::now();
    let mut back_at = None;
    let back = eventually(
        FIRST_EJECTION.saturating_sub(out_at.elapsed()) + Duration::from_secs(5),
        async || {
            let since = traffic.answered_since(healed);
            let of = pods_of(&envoy, &pods, &since).await;
            back_at = since
                .iter()
                .zip(&of)
                .filter(|(s, p)| **p == 0 && s.status == Some(200))
                .map(|(s, _)| s.started)
                .min();
            back_at.is_some()
        },
    )
    .await;
    assert!(
        back,
        "the recovered pod got no request {:?} after the fault\n{}",
        out_at.elapsed(),
        kvroute.metrics().await
    );
    let back_at = back_at.unwrap();
    println!(
        "served again {:?} after the fault ({:?} after it was cleared)",
        back_at - faulted,
        back_at.saturating_duration_since(healed)
    );
    if out {
        // Not before its ejection is over.
        assert!(back_at - out_at >= FIRST_EJECTION - Duration::from_millis(500));
    }

    // And it gets its share again.
    let recovered_from = Instant::now();
    let recovered = traffic
        .wait_answered_since(recovered_from, 60, Duration::from_secs(20))
        .await;
    let counts = per_pod(&pods_of(&envoy, &pods, &recovered).await, pods.len());
    println!("after recovery, requests per pod: {counts:?}");
    assert!(
        recovered.iter().all(|s| s.status == Some(200)),
        "{recovered:?}"
    );
    assert!(counts[0] >= 6, "the recovered pod's share: {counts:?}");
    let m = kvroute.metrics().await;
    assert!(ejected(&m, 0), "{m}");

    let (sent, answers) = traffic.stop().await;
    assert_eq!(sent, answers.len());
    assert!(answers.iter().all(|s| s.status.is_some()), "lost requests");
    let statuses = answers.iter().fold(HashMap::new(), |mut h, s| {
        *h.entry(s.status.unwrap()).or_insert(0) += 1;
        h
    });
    println!("{sent} requests in {:?}: {statuses:?}", begin.elapsed());
    // The only failures are the failing pod's, and there were few: at most the five that
    // eject it, give or take those already on their way.
    let failed: Vec<Sent> = answers
        .into_iter()
        .filter(|s| s.status != Some(200))
        .collect();
    let of = pods_of(&envoy, &pods, &failed).await;
    assert!(of.iter().all(|&p| p == 0), "{failed:?} went to {of:?}");
    assert!(failed.len() <= 10, "{} requests failed", failed.len());
    stop.cancel();
}
