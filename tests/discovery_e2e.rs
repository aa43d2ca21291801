//! Kubernetes discovery end to end: `kvroute serve --pool-name` reads an `InferencePool`
//! and its pods from the in-process API server (`test_support::apiserver`, through a
//! kubeconfig as a user's would point at a cluster), simulated vLLM pods serve on their own
//! loopback addresses (127.0.0.k, one target port, as pod IPs do), real Envoy is in front
//! and a steady stream of chat requests flows while pods come and go. None is lost and none
//! goes to a pod that has left.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use kvroute_sim::server::Bound;
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use tokio_util::sync::CancellationToken;

const NS: &str = "llm";

/// A simulated pod at 127.0.0.`k`:`port` publishing KV events on `events`, stopped with
/// its own token.
async fn pod_at(k: u8, port: u16, events: u16) -> (Bound, CancellationToken) {
    let stop = CancellationToken::new();
    (sim_pod_at(k, port, events, 10.0, stop.clone()).await, stop)
}

fn ready_pod(name: &str, k: u8, ready: bool) -> serde_json::Value {
    pod(NS, name, &format!("127.0.0.{k}"), &[("app", "vllm")], ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_and_go_while_requests_flow() {
    let dir = scratch("discovery");
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    // One target port and one events port for every pod, as in a cluster.
    let (port, events) = (free_port(), free_port());
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[port]),
    );
    let mut pods = Vec::new();
    for (name, k) in [("a", 2), ("b", 3), ("c", 4)] {
        pods.push((name, pod_at(k, port, events).await));
        api.apply(&Resource::pods(), ready_pod(name, k, true));
    }
    let kvroute = Kvroute::for_pool(
        &dir,
        &api,
        NS,
        &[
            "--refresh-metrics-interval",
            "50ms",
            "--kv-events-port",
            &events.to_string(),
        ],
    )
    .await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|(_, (b, _))| b.http).collect();
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;

    let confirmed = |m: &str, pod: &str| {
        m.contains(&format!(
            "kvroute_endpoint_kv_events_confirmed{{endpoint=\"{pod}\"}} 1"
        ))
    };
    let traffic = Traffic::start(envoy.port, 4, "disc");
    let begin = Instant::now();
    let warm = traffic
        .wait_answered_since(begin, 40, Duration::from_secs(20))
        .await;
    let up = envoy.upstreams_of(&warm).await;
    for (_, (bound, _)) in &pods {
        let n = up.iter().filter(|u| **u == bound.http.to_string()).count();
        assert!(n > 0, "pod {} got none of {up:?}", bound.http);
    }
    // Without a replay port a stream is in sequence from its first live message on.
    let mut m = String::new();
    let subscribed = eventually(Duration::from_secs(10), async || {
        m = kvroute.metrics().await;
        ["a", "b", "c"].iter().all(|p| confirmed(&m, p))
    })
    .await;
    assert!(subscribed, "KV events not followed for every pod: {m}");

    // A new pod: running first, then Ready in the API; requests reach it.
    let (d, d_stop) = pod_at(5, port, events).await;
    api.apply(&Resource::pods(), ready_pod("d", 5, false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready_at = Instant::now();
    api.apply(&Resource::pods(), ready_pod("d", 5, true));
    let mut first = None;
    let reached = eventually(Duration::from_secs(10), async || {
        let sent = traffic.answered_since(ready_at);
        let ups = envoy.upstreams();
        first = sent
            .iter()
            .filter(|s| ups.get(&s.id).is_some_and(|u| *u == d.http.to_string()))
            .map(|s| s.started)
            .min();
        first.is_some()
    })
    .await;
    assert!(
        reached,
        "the new pod got no request: {}",
        kvroute.log_text()
    );
    println!(
        "pod Ready to its first routed request (sent): {:?}",
        first.unwrap() - ready_at
    );
    pods.push(("d", (d, d_stop)));
    assert!(
        eventually(Duration::from_secs(10), async || confirmed(
            &kvroute.metrics().await,
            "d"
        ))
        .await,
        "the new pod's KV events are not followed"
    );

    // Pod "a" is deleted (as Kubernetes does on scale-in: the API object goes, the
    // process gets a grace period to finish what it holds).
    let a = pods[0].1.0.http.to_string();
    api.delete(&Resource::pods(), NS, "a");
    let gone = eventually(Duration::from_secs(5), async || {
        !kvroute
            .metrics()
            .await
            .contains("kvroute_endpoint_in_flight_requests{endpoint=\"a\"}")
    })
    .await;
    let left_at = Instant::now();
    assert!(gone, "a never left: {}", kvroute.log_text());
    let m = kvroute.metrics().await;
    assert!(
        !m.lines().any(|l| l.contains("endpoint=\"a\"")),
        "a's series outlived it: {m}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    pods[0].1.1.cancel();

    // Pod "b" turns not ready (a failing readiness probe): no new request for it.
    api.apply(&Resource::pods(), ready_pod("b", 3, false));
    let b = pods[1].1.0.http.to_string();
    assert!(
        eventually(Duration::from_secs(5), async || {
            !kvroute
                .metrics()
                .await
                .contains("kvroute_endpoint_in_flight_requests{endpoint=\"b\"}")
        })
        .await
    );
    let unready_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (sent, answers) = traffic.stop().await;
    assert_eq!(answers.len(), sent, "every request came back");
    let failed: Vec<&Sent> = answers.iter().filter(|s| s.status != Some(200)).collect();
    assert!(failed.is_empty(), "lost requests: {failed:?}");
    let ups = envoy.upstreams_of(&answers).await;
    for (s, u) in answers.iter().zip(&ups) {
        assert!(
            !(s.started > left_at && *u == a),
            "{} went to deleted pod a after it left",
            s.id
        );
        assert!(
            !(s.started > unready_at && *u == b),
            "{} went to unready pod b after it left",
            s.id
        );
    }
    println!(
        "{sent} requests, none lost; after the changes: {} to the others",
        answers.iter().filter(|s| s.started > unready_at).count()
    );
    // Upstream's metric names, for dashboards built on the upstream picker: c and d remain.
    let m = kvroute.metrics().await;
    for want in [
        "llm_d_epp_ready_endpoints{name=\"pool\"} 2",
        "inference_pool_ready_pods{name=\"pool\"} 2",
        "llm_d_epp_request_total{model_name=\"m\",target_model_name=\"m\",fairness_id=\"\",priority=\"0\"}",
        "inference_objective_request_total{model_name=\"m\"",
        "llm_d_epp_request_ttft_seconds_count{model_name=\"m\"",
        "llm_d_epp_per_endpoint_queue_size{name=\"pool\",model_server_endpoint=\"c\"}",
    ] {
        assert!(m.contains(want), "missing {want}: {m}");
    }
    for (_, (_, stop)) in &pods {
        stop.cancel();
    }
}

/// What kvroute's index holds (entries, blocks) and what `pods` cache (cached blocks,
/// distinct ones): equal once the index has caught up (16-token blocks on both sides, one
/// kvroute block per engine hash the pod reports).
async fn index_and_truth(kvroute: &Kvroute, pods: &[&Bound]) -> [(f64, f64); 2] {
    let mut total = 0;
    let mut distinct = std::collections::HashSet::new();
    for pod in pods {
        let cache = sim_cache(pod).await;
        total += cache.len();
        distinct.extend(cache);
    }
    let m = kvroute.metrics().await;
    [
        (
            sample(&m, "kvroute_kv_index_entries"),
            sample(&m, "kvroute_kv_index_blocks"),
        ),
        (total as f64, distinct.len() as f64),
    ]
}

/// A pod whose readiness flaps (31 changes, 100–300 ms apart, through the API server) while
/// requests flow through Envoy: none is lost; once it stays NotReady it gets no request and
/// its KV-event entries leave the index; Ready again, it gets requests, and its entries come
/// back from its replay socket, the index matching what the pods cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_flapping_readiness_loses_no_request() {
    let begin = Instant::now();
    let dir = scratch("discovery-flap");
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    let ports = [free_port(), free_port(), free_port()];
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[ports[0]]),
    );
    let stop = CancellationToken::new();
    let mut pods = Vec::new();
    for (name, k) in [("a", 2), ("b", 3), ("c", 4)] {
        pods.push(
            sim_pod_ports(k, ports, 10.0, stop.child_token())
                .await
                .unwrap(),
        );
        api.apply(&Resource::pods(), ready_pod(name, k, true));
    }
    let kvroute = Kvroute::for_pool(
        &dir,
        &api,
        NS,
        &[
            "--refresh-metrics-interval",
            "50ms",
            "--kv-events-port",
            &ports[1].to_string(),
            "--kv-replay-port",
            &ports[2].to_string(),
        ],
    )
    .await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|b| b.http).collect();
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
    let confirmed = |m: &str, pod: &str| {
        sample(
            m,
            &format!("kvroute_endpoint_kv_events_confirmed{{endpoint=\"{pod}\"}}"),
        ) == 1.0
    };
    let mut m = String::new();
    let subscribed = eventually(Duration::from_secs(10), async || {
        m = kvroute.metrics().await;
        ["a", "b", "c"].iter().all(|p| confirmed(&m, p))
    })
    .await;
    assert!(subscribed, "KV events not followed for every pod: {m}");

    let c = pods[2].http.to_string();
    let traffic = Traffic::start(envoy.port, 4, "flap");
    let warm = traffic
        .wait_answered_since(begin, 60, Duration::from_secs(20))
        .await;
    let up = envoy.upstreams_of(&warm).await;
    assert!(up.contains(&c), "c got none of {up:?}");

    // 31 changes, Ready first: it ends NotReady.
    for i in 0..31u64 {
        api.apply(&Resource::pods(), ready_pod("c", 4, i % 2 == 1));
        tokio::time::sleep(Duration::from_millis(100 + i * 67 % 201)).await;
    }
    let gone = eventually(Duration::from_secs(10), async || {
        !kvroute
            .metrics()
            .await
            .contains("kvroute_endpoint_in_flight_requests{endpoint=\"c\"}")
    })
    .await;
    assert!(gone, "c never left: {}", kvroute.log_text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = Instant::now();
    let since = traffic
        .wait_answered_since(settled, 100, Duration::from_secs(20))
        .await;
    let (sent, answers) = traffic.stop().await;
    assert_eq!(answers.len(), sent, "every request came back");
    let failed: Vec<&Sent> = answers.iter().filter(|s| s.status != Some(200)).collect();
    assert!(failed.is_empty(), "lost while c flapped: {failed:?}");
    let ups = envoy.upstreams_of(&answers).await;
    for (s, u) in answers.iter().zip(&ups) {
        assert!(
            addrs.iter().any(|a| a.to_string() == *u),
            "{} went to {u:?}",
            s.id
        );
        assert!(
            !(s.started > settled && *u == c),
            "{} went to c, NotReady since {:?} before it was sent",
            s.id,
            s.started - settled
        );
    }
    println!(
        "{sent} requests while c flapped, none lost; {} to c, {} sent after it settled out",
        ups.iter().filter(|u| **u == c).count(),
        since.len()
    );

    // Out of the pool, c's entries leave the index (its cache stays).
    let c_cache = sim_cache(&pods[2]).await.len();
    assert!(c_cache > 0, "c cached nothing");
    let mut seen = [(0.0, 0.0); 2];
    let out = eventually(Duration::from_secs(10), async || {
        seen = index_and_truth(&kvroute, &[&pods[0], &pods[1]]).await;
        seen[0] == seen[1]
    })
    .await;
    assert!(
        out,
        "with c out, kvroute holds {:?}, a and b cache {:?} (c {c_cache})",
        seen[0], seen[1]
    );

    // Ready again: its entries come back from its replay socket, and requests reach it.
    api.apply(&Resource::pods(), ready_pod("c", 4, true));
    let all = [&pods[0], &pods[1], &pods[2]];
    let back = eventually(Duration::from_secs(10), async || {
        seen = index_and_truth(&kvroute, &all).await;
        seen[0] == seen[1]
    })
    .await;
    assert!(
        back,
        "with c back, kvroute holds {:?}, the pods cache {:?} (c {c_cache})",
        seen[0], seen[1]
    );
    let ready_at = Instant::now();
    let traffic = Traffic::start_from(envoy.port, 4, "flap-back", 1_000_000);
    let reached = eventually(Duration::from_secs(10), async || {
        let ups = envoy.upstreams();
        traffic
            .answered_since(ready_at)
            .iter()
            .any(|s| ups.get(&s.id) == Some(&c))
    })
    .await;
    assert!(
        reached,
        "c got no request once Ready again: {}",
        kvroute.log_text()
    );
    let (sent, answers) = traffic.stop().await;
    assert_eq!(answers.len(), sent, "every request came back");
    let failed: Vec<&Sent> = answers.iter().filter(|s| s.status != Some(200)).collect();
    assert!(failed.is_empty(), "lost once c was back: {failed:?}");
    let settled = eventually(Duration::from_secs(10), async || {
        seen = index_and_truth(&kvroute, &all).await;
        seen[0] == seen[1]
    })
    .await;
    assert!(
        settled,
        "at the end kvroute holds {:?}, the pods cache {:?}",
        seen[0], seen[1]
    );
    println!(
        "index (entries, blocks) {:?} as the pods cache, after {:?}",
        seen[0],
        begin.elapsed()
    );
    stop.cancel();
}

/// `/readyz` and gRPC health (what Envoy's health check and the kubelet's probe ask) stay
/// not ready until the pool exists and its pods were listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_pool_is_listed() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = scratch("discovery-ready");
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    api.apply(&Resource::pods(), ready_pod("a", 2, true));
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig(NS)).unwrap();
    let kvroute = Kvroute::launch(
        &dir,
        &["--pool-name", "pool", "--pool-namespace", NS],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", kvroute.health_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = HealthClient::new(channel);
    let status = async |health: &mut HealthClient<tonic::transport::Channel>| {
        health
            .check(HealthCheckRequest {
                service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let readyz = http(kvroute.admin_port, "GET", "/readyz", &[], Vec::new()).await;
    assert_eq!(readyz.status, 503, "{}", readyz.text());
    assert!(readyz.text().contains("not listed"), "{}", readyz.text());
    assert_eq!(status(&mut health).await, ServingStatus::NotServing as i32);

    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
    );
    let ready = eventually(Duration::from_secs(10), async || {
        http(kvroute.admin_port, "GET", "/readyz", &[], Vec::new())
            .await
            .status
            == 200
    })
    .await;
    assert!(ready, "{}", kvroute.log_text());
    assert_eq!(status(&mut health).await, ServingStatus::Serving as i32);
}

/// `--metrics-endpoint-auth`: `/metrics` answers a bearer token the API server vouches for
/// (TokenReview) whose user may `get /metrics` (SubjectAccessReview); 401 without a valid
/// token, 403 for a user who may not; the probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_token_the_api_server_vouches_for() {
    let dir = scratch("metrics-auth");
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
    );
    api.token(
        "scraper-token",
        "system:serviceaccount:monitoring:prometheus",
        true,
    );
    api.token("other-token", "system:serviceaccount:llm:someone", false);
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig(NS)).unwrap();
    let kvroute = Kvroute::spawn_env(
        &dir,
        &[
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--metrics-endpoint-auth",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let get = async |auth: Option<&str>| {
        let headers: Vec<(&str, String)> = auth
            .map(|t| vec![("authorization", format!("Bearer {t}"))])
            .unwrap_or_default();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http(kvroute.admin_port, "GET", "/metrics", &headers, Vec::new()).await
    };
    assert_eq!(get(None).await.status, 401);
    assert_eq!(get(Some("forged")).await.status, 401);
    assert_eq!(get(Some("other-token")).await.status, 403);
    let ok = get(Some("scraper-token")).await;
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("kvroute_endpoints"));
    let reviews = api.served().reviews;
    assert_eq!(get(Some("scraper-token")).await.status, 200);
    assert_eq!(api.served().reviews, reviews, "the verdict is cached");
    // The probes need no token.
    let ready = http(kvroute.admin_port, "GET", "/readyz", &[], Vec::new()).await;
    assert_eq!(ready.status, 200);
    // Exactly the two reviews, as deploy/kubernetes/metrics-auth.yaml grants.
    let calls: Vec<_> = api
        .calls()
        .into_iter()
        .filter(|(_, _, verb, _)| verb == "create")
        .map(|(group, resource, ..)| format!("{group}/{resource}"))
        .collect();
    assert_eq!(
        calls,
        [
            "authentication.k8s.io/tokenreviews",
            "authorization.k8s.io/subjectaccessreviews"
        ]
    );
}
