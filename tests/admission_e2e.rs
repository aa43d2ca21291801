//! Admission end to end, through real Envoy and the real `kvroute serve`.
//!
//! - Shedding: an `InferencePool` and `InferenceObjective`s (`batch` priority -1,
//!   `critical` 10) from the in-process API server, slow simulated pods (two sequences at a
//!   time each) and many clients at once: while the pool is saturated only `batch` requests
//!   are answered 429 `rejected-saturated`, every `critical` one is served, every request is
//!   answered.
//! - Flow control under the same overload: critical requests wait their turn and are all
//!   served; sheddable ones are refused once their band is full (429 `rejected-saturated`),
//!   none is lost.
//! - Flow control, scale from zero: with no pod, requests wait; one that waits out
//!   `noEndpointRequestTTL` is answered 503 `rejected-no-endpoints`; those waiting when a pod
//!   turns Ready are served.
//! - Flow control, TTL: a pool whose pods publish no metrics counts as saturated, so
//!   requests wait; one whose client goes away leaves the queue, one that waits out
//!   `defaultRequestTTL` is answered 429 `rejected-ttl-expired`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use kvroute_sim::server::{Bound, ServerConfig};
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use tokio_util::sync::CancellationToken;

const NS: &str = "llm";

/// A simulated pod at 127.0.0.`k`:`port` that runs two sequences at a time at the modelled
/// speed: a few clients keep requests waiting in its queue.
async fn slow_pod(k: u8, port: u16, stop: &CancellationToken) -> Bound {
    let mut profile = kvroute_sim::Profile::h100_llama31_8b();
    profile.max_num_seqs = 2;
    let at = |p| SocketAddr::from(([127, 0, 0, k], p));
    kvroute_sim::server::start(
        ServerConfig {
            http: at(port),
            events: at(0),
            replay: at(0),
            topic: String::new(),
            model: "m".into(),
            profile,
            speed: 1.0,
            encoding: kvroute_sim::wire::EventEncoding::Map,
            tokenizer: None,
            chat_template: None,
            lora_adapters: Vec::new(),
            force_include_usage: false,
            pd: kvroute_sim::server::PdConfig::default(),
        },
        stop.child_token(),
    )
    .await
    .unwrap()
}

fn ready_pod(name: &str, k: u8) -> serde_json::Value {
    pod(NS, name, &format!("127.0.0.{k}"), &[("app", "vllm")], true)
}

fn objective(name: &str, priority: i32) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"priority": priority, "poolRef": {"name": "pool"}}
    })
}

/// An API server holding the pool (pods labelled `app=vllm` on `port`).
fn api_with_pool(api: &ApiServer, port: u16) {
    api.install(Resource::inference_pool());
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[port]),
    );
}

/// What one request came back with.
#[derive(Debug)]
struct Answer {
    objective: &'static str,
    status: Option<u16>,
    dropped: String,
    waited: Duration,
}

/// One chat request through Envoy on `port`, naming `objective` (none when empty).
async fn ask(port: u16, objective: &'static str, n: usize, max_tokens: u32) -> Answer {
    let body = serde_json::json!({
        "model": "m",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": format!("{n:06} Question {n} from {objective}?")}]
    });
    let mut headers = vec![("x-request-id", format!("{objective}-{n}"))];
    if !objective.is_empty() {
        headers.push(("x-llm-d-inference-objective", objective.to_owned()));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    let reply = test_support::http::try_request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().into_bytes(),
    )
    .await;
    Answer {
        objective,
        status: reply.as_ref().ok().map(|r| r.status),
        dropped: reply
            .map(|r| r.header("x-llm-d-request-dropped-reason").to_owned())
            .unwrap_or_default(),
        waited: started.elapsed(),
    }
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("routing.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

const SHEDDING: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: utilization-detector
  name: detector
  parameters: {queueDepthThreshold: 2, metricsStalenessThreshold: 1s}
saturationDetector:
  pluginRef: detector
";

/// `kvroute serve` on the in-process API server's pool with routing configuration `config`,
/// scraping the pods every 50 ms.
async fn serve(dir: &std::path::Path, api: &ApiServer, config: &str) -> Kvroute {
    let config = write_config(dir, config);
    Kvroute::for_pool(
        dir,
        api,
        NS,
        &[
            "--config-file",
            &config,
            "--refresh-metrics-interval",
            "50ms",
        ],
    )
    .await
}

/// Two slow pods (two sequences at a time) in a pool from the in-process API server, with
/// the objectives `batch` (−1, sheddable) and `critical` (10), `kvroute serve` on the pool
/// with routing configuration `config`, and real Envoy in front, once kvroute knows the
/// objectives and sees the idle pool unsaturated.
struct Overloaded {
    stop: CancellationToken,
    _api: ApiServer,
    kvroute: Kvroute,
    envoy: Envoy,
    /// Last, so it goes once the processes writing there have.
    _dir: Scratch,
}

impl Overloaded {
    async fn start(name: &str, config: &str) -> Self {
        let dir = scratch(name);
        let stop = CancellationToken::new();
        let api = ApiServer::start().await;
        let port = free_port();
        api_with_pool(&api, port);
        api.install(Resource::inference_objective());
        api.apply(&Resource::inference_objective(), objective("batch", -1));
        api.apply(&Resource::inference_objective(), objective("critical", 10));
        let mut pods = Vec::new();
        for (name, k) in [("a", 2), ("b", 3)] {
            pods.push(slow_pod(k, port, &stop).await);
            api.apply(&Resource::pods(), ready_pod(name, k));
        }
        let kvroute = serve(&dir, &api, config).await;
        let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
        let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
        // Objectives known and the pods scraped: the idle pool is not saturated.
        let mut m = String::new();
        let calm = eventually(Duration::from_secs(20), async || {
            m = kvroute.metrics().await;
            sample(&m, "kvroute_inference_objectives") == 2.0
                && m.contains("kvroute_pool_saturation ")
                && sample(&m, "kvroute_pool_saturation") < 1.0
        })
        .await;
        assert!(calm, "objectives or scrapes missing: {m}");
        Self {
            stop,
            _api: api,
            kvroute,
            envoy,
            _dir: dir,
        }
    }
}

/// 12 critical and 12 sheddable clients through Envoy at `port`, each asking `requests`
/// times in turn (48 tokens each); with `back_off`, a client refused with a 429 waits 50 ms
/// before its next request, as a well-behaved one would.
fn clients(
    port: u16,
    requests: usize,
    back_off: bool,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    (0..24)
        .map(|c| {
            let objective = if c % 2 == 0 { "critical" } else { "batch" };
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..requests {
                    out.push(ask(port, objective, 1 + c * 100 + i, 48).await);
                    if back_off && out.last().is_some_and(|a| a.status == Some(429)) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                out
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sheddable_work_is_shed_under_overload_and_none_is_lost() {
    let Overloaded {
        _dir,
        stop,
        _api,
        kvroute,
        envoy,
    } = Overloaded::start("admission-shed", SHEDDING).await;
    // Sheddable work is served while the pool has room.
    let idle = ask(envoy.port, "batch", 0, 4).await;
    assert_eq!(idle.status, Some(200), "{idle:?}");

    // 12 critical and 12 sheddable clients, 6 requests each, back to back, against four
    // sequences running at once.
    let clients = clients(envoy.port, 6, true);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    assert_eq!(answers.len(), 24 * 6, "every request came back");
    let lost: Vec<&Answer> = answers.iter().filter(|a| a.status.is_none()).collect();
    assert!(lost.is_empty(), "requests without an answer: {lost:?}");
    let critical_failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.objective == "critical" && a.status != Some(200))
        .collect();
    assert!(
        critical_failed.is_empty(),
        "critical requests not served: {critical_failed:?}"
    );
    let shed: Vec<&Answer> = answers.iter().filter(|a| a.status == Some(429)).collect();
    for a in &shed {
        assert_eq!(a.objective, "batch", "{a:?}");
        assert_eq!(a.dropped, "rejected-saturated", "{a:?}");
    }
    let odd: Vec<&Answer> = answers
        .iter()
        .filter(|a| !matches!(a.status, Some(200 | 429)))
        .collect();
    assert!(odd.is_empty(), "answers other than 200 and 429: {odd:?}");
    assert!(!shed.is_empty(), "the overload shed nothing");
    let served_batch = answers
        .iter()
        .filter(|a| a.objective == "batch" && a.status == Some(200))
        .count();
    println!(
        "{} requests: {} critical all served, {} sheddable shed with 429, {served_batch} sheddable served",
        answers.len(),
        answers.len() / 2,
        shed.len()
    );
    let m = kvroute.metrics().await;
    assert_eq!(
        sample(&m, "kvroute_requests_total{outcome=\"rejected_saturated\"}") as usize,
        shed.len(),
        "{m}"
    );
    // Upstream's error metric names the shed requests' priority and code.
    assert!(
        m.contains("priority=\"-1\",error_code=\"ResourceExhausted\"}"),
        "{m}"
    );
    stop.cancel();
}

const FLOW_UNDER_LOAD: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: utilization-detector
  parameters: {queueDepthThreshold: 2, metricsStalenessThreshold: 1s}
flowControl:
  defaultRequestTTL: 20s
  defaultNegativePriorityBand: {maxRequests: 4}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_under_overload_holds_critical_work_and_bounds_sheddable_work() {
    let Overloaded {
        _dir,
        stop,
        _api,
        kvroute,
        envoy,
    } = Overloaded::start("admission-flow-load", FLOW_UNDER_LOAD).await;

    let clients = clients(envoy.port, 4, false);
    // The queue holds requests while the pool is saturated.
    let mut most_waiting = 0.0f64;
    while clients.iter().any(|c| !c.is_finished()) {
        let m = kvroute.metrics().await;
        most_waiting = most_waiting.max(sample(
            &m,
            "kvroute_flow_control_queue_size{priority=\"10\"}",
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    assert_eq!(answers.len(), 24 * 4, "every request came back");
    for a in &answers {
        match (a.objective, a.status, a.dropped.as_str()) {
            (_, Some(200), "") => {}
            ("batch", Some(429), "rejected-saturated" | "rejected-ttl-expired") => {}
            _ => panic!("unexpected answer {a:?}"),
        }
    }
    let refused = answers.iter().filter(|a| a.status == Some(429)).count();
    assert!(refused > 0, "the sheddable band never filled");
    assert!(most_waiting > 0.0, "no critical request ever waited");
    println!(
        "{} requests: 48 critical all served (up to {most_waiting} waiting at once), {refused} sheddable refused",
        answers.len()
    );
    assert!(
        !kvroute
            .metrics()
            .await
            .contains("kvroute_flow_control_queue_size{"),
        "nothing left in the queue"
    );
    stop.cancel();
}

const FLOW: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
flowControl:
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 3s
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_holds_requests_until_a_pod_appears() {
    let dir = scratch("admission-zero");
    let stop = CancellationToken::new();
    let api = ApiServer::start().await;
    let port = free_port();
    api_with_pool(&api, port);
    let kvroute = serve(&dir, &api, FLOW).await;
    let pod_addr = SocketAddr::from(([127, 0, 0, 2], port));
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &[pod_addr]),
    )
    .await;

    // No pod at all: the request waits out noEndpointRequestTTL, then 503.
    let alone = ask(envoy.port, "", 0, 4).await;
    assert_eq!(alone.status, Some(503), "{alone:?}");
    assert_eq!(alone.dropped, "rejected-no-endpoints", "{alone:?}");
    assert!(
        alone.waited >= Duration::from_millis(2_500),
        "answered before its TTL: {alone:?}"
    );

    // Three requests wait; a pod turns Ready; all three are served.
    let waiting: Vec<_> = (1..=3)
        .map(|n| tokio::spawn(ask(envoy.port, "", n, 4)))
        .collect();
    let queued = eventually(Duration::from_secs(2), async || {
        sample(
            &kvroute.metrics().await,
            "kvroute_flow_control_queue_size{priority=\"0\"}",
        ) == 3.0
    })
    .await;
    assert!(queued, "not queued: {}", kvroute.metrics().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "answered with no pod"
    );
    let appeared = Instant::now();
    let bound = slow_pod(2, port, &stop).await;
    assert_eq!(bound.http, pod_addr);
    api.apply(&Resource::pods(), ready_pod("a", 2));
    for w in waiting {
        let a = w.await.unwrap();
        assert_eq!(a.status, Some(200), "{a:?}");
    }
    println!(
        "three requests held with no pod, served {:?} after it turned Ready",
        appeared.elapsed()
    );
    let m = kvroute.metrics().await;
    assert!(
        !m.contains("kvroute_flow_control_queue_size{"),
        "the queue is empty: {m}"
    );
    assert_eq!(
        sample(&m, "kvroute_requests_total{outcome=\"no_endpoint\"}"),
        1.0
    );
    stop.cancel();
}

const TTL: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
flowControl:
  defaultRequestTTL: 4s
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_answers_at_the_ttl_and_forgets_clients_that_left() {
    let dir = scratch("admission-ttl");
    // Backends that publish no /metrics: their load is never known, so the pool counts as
    // saturated and nothing is dispatched.
    let backends = Backends::start(1, Duration::ZERO).await;
    let config = write_config(&dir, TTL);
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--config-file", &config]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let queue = async || {
        sample(
            &kvroute.metrics().await,
            "kvroute_flow_control_queue_size{priority=\"0\"}",
        )
    };

    // A client that gives up after 300 ms: its request leaves the queue with it.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), ask(envoy.port, "", 0, 4)).await;
    assert!(gave_up.is_err(), "answered at once: {gave_up:?}");
    let left = eventually(Duration::from_millis(2_500), async || queue().await == 0.0).await;
    assert!(
        left,
        "the abandoned request still waits: {}",
        kvroute.metrics().await
    );

    // One that stays is answered at its TTL.
    let a = ask(envoy.port, "", 1, 4).await;
    assert_eq!(a.status, Some(429), "{a:?}");
    assert_eq!(a.dropped, "rejected-ttl-expired", "{a:?}");
    assert!(
        a.waited >= Duration::from_millis(3_500) && a.waited < Duration::from_secs(10),
        "{a:?}"
    );
    let m = kvroute.metrics().await;
    assert_eq!(
        sample(
            &m,
            "kvroute_requests_total{outcome=\"rejected_ttl_expired\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "kvroute_requests_total{outcome=\"routed_by_load\"}"),
        0.0,
        "nothing reached a backend: {m}"
    );
}
