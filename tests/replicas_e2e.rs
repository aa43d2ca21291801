//! Active-active end to end (issue 20): two `kvroute serve` replicas in one Envoy ext_proc
//! cluster (Envoy balances the streams over them, full duplex, fail closed), both following
//! the same two simulated pods' KV events. Each replica routes a share of the requests and
//! both send a prefix where the events say it is cached, though neither saw the other's
//! decisions. Then one replica is stopped as a rolling update stops it (SIGTERM: lame duck,
//! health NOT_SERVING, drain) while requests flow: none is lost, the other carries them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::*;
use tokio_util::sync::CancellationToken;

/// Routed requests a replica reports.
async fn routed(k: &Kvroute) -> f64 {
    sample(
        &k.metrics().await,
        "kvroute_requests_total{outcome=\"routed\"}",
    )
}

/// Blocks a replica has applied from the pods' `BlockStored` events.
async fn stored(k: &Kvroute) -> f64 {
    sample(
        &k.metrics().await,
        "kvroute_kv_event_blocks_total{op=\"stored\"}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_agree_from_the_same_events_and_a_rolling_restart_loses_nothing() {
    let dir = scratch("replicas");
    let stop = CancellationToken::new();
    let pods = pool_pods(2, 100.0, &stop).await;
    let list: Vec<String> = pods.iter().map(|p| p.http.to_string()).collect();
    let (events, replay) = (
        pods[0].events.port().to_string(),
        pods[0].replay.port().to_string(),
    );
    // Longer than Envoy needs to see the health check fail twice, 2 s apart.
    let args = [
        "--kv-events-port",
        events.as_str(),
        "--kv-replay-port",
        replay.as_str(),
        "--block-size",
        "16",
        "--lame-duck",
        "8s",
    ];
    let mut a = Kvroute::start(&dir, &list.join(","), &args).await;
    let b = Kvroute::start(&dir, &list.join(","), &args).await;
    for k in [&a, &b] {
        for pod in &pods {
            let key = format!(
                "kvroute_endpoint_kv_events_confirmed{{endpoint=\"{}\"}}",
                pod.http
            );
            let followed = eventually(Duration::from_secs(20), async || {
                sample(&k.metrics().await, &key) == 1.0
            })
            .await;
            assert!(followed, "{} not followed: {}", pod.http, k.log_text());
        }
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions {
            more_grpc_ports: &[b.grpc_port],
            ..EnvoyOptions::full_duplex(a.grpc_port, &addrs)
        },
    )
    .await;

    // A document cached on each pod, sent there directly: only the events tell the
    // replicas where they are.
    let documents: Vec<Vec<u32>> = (0..2u32)
        .map(|d| (d * 10_000..d * 10_000 + 256).collect())
        .collect();
    for (pod, document) in pods.iter().zip(&documents) {
        let r = test_support::http::request(
            pod.http,
            "POST",
            "/v1/completions",
            &[],
            completion(document),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for k in [&a, &b] {
        let seen = eventually(Duration::from_secs(10), async || stored(k).await >= 32.0).await;
        assert!(seen, "{}", k.metrics().await);
    }
    let before = [routed(&a).await, routed(&b).await];
    for round in 0..10u32 {
        for (home, document) in documents.iter().enumerate() {
            let mut prompt = document.clone();
            prompt.extend((0..16).map(|i| 500_000 + round * 100 + i));
            let id = format!("agree-{round}-{home}");
            let reply = http(
                envoy.port,
                "POST",
                "/v1/completions",
                &[("x-request-id", &id)],
                completion(&prompt),
            )
            .await;
            assert_eq!(reply.status, 200, "{reply:?}");
            let mut upstream = String::new();
            let logged = eventually(Duration::from_secs(5), async || {
                upstream = envoy.upstreams().remove(&id).unwrap_or_default();
                !upstream.is_empty()
            })
            .await;
            assert!(logged, "{id} not in Envoy's access log");
            assert_eq!(
                upstream,
                pods[home].http.to_string(),
                "{id}: the document is cached on pod {home}"
            );
        }
    }
    let shares = [routed(&a).await - before[0], routed(&b).await - before[1]];
    assert_eq!(shares[0] + shares[1], 20.0);
    assert!(
        shares.iter().all(|&n| n >= 3.0),
        "both replicas decided part of the requests: {shares:?}"
    );

    // A rolling update stops replica a under load.
    let traffic = Traffic::start(envoy.port, 4, "rolling");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_before = routed(&b).await;
    a.terminate();
    // Envoy's health checks take a out within its lame-duck period, while it still routes.
    let out = eventually(Duration::from_secs(8), async || {
        envoy
            .stats()
            .await
            .contains("cluster.kvroute.membership_healthy: 1")
    })
    .await;
    assert!(out, "Envoy still counts both replicas healthy");
    let exited = a.wait_exit(Duration::from_secs(40)).await;
    assert_eq!(exited, Some(true), "{}", a.log_text());
    let after_exit = routed(&b).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, answers) = traffic.stop().await;
    let failed: Vec<_> = answers.iter().filter(|s| s.status != Some(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {sent} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(answers.len(), sent, "every request came back");
    assert!(
        routed(&b).await > after_exit && after_exit > b_before,
        "replica b carried the traffic before and after a left"
    );
    stop.cancel();
}
