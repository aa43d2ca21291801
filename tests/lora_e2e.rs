//! LoRA affinity end to end: three simulated vLLM pods serving adapters `a` and `b` with one
//! adapter slot each, the real `kvroute serve` scraping their `vllm:lora_requests_info`
//! every 50 ms and scoring with `lora-affinity-scorer` beside a load scorer, real Envoy in
//! front. While one pod runs a long request for `a`, later requests for `a` go to that pod
//! though it is the busiest (1.0 there, 0.8 where a slot is free), and requests for `b`
//! avoid it (its one slot is taken: 0).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::*;
use kvroute_sim::server::{self, Bound, ServerConfig};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "
plugins: [{type: lora-affinity-scorer}, {type: load-scorer}, {type: max-score-picker}]
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: lora-affinity-scorer, weight: 5}
  - {pluginRef: load-scorer}
  - {pluginRef: max-score-picker}
";

/// A pod serving adapters `a` and `b`, one at a time, at the modelled speed.
async fn lora_pod(stop: &CancellationToken) -> Bound {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    server::start(
        ServerConfig {
            http: any,
            events: any,
            replay: any,
            topic: String::new(),
            model: "m".into(),
            profile: kvroute_sim::Profile::h100_llama31_8b().with_max_loras(1),
            speed: 1.0,
            encoding: kvroute_sim::wire::EventEncoding::Map,
            tokenizer: None,
            chat_template: None,
            lora_adapters: vec!["a".into(), "b".into()],
            force_include_usage: false,
            pd: kvroute_sim::server::PdConfig::default(),
        },
        stop.child_token(),
    )
    .await
    .unwrap()
}

/// A completion for `adapter` through Envoy on `port`.
async fn ask(port: u16, adapter: &str, n: usize, max_tokens: u32) -> u16 {
    let body = serde_json::json!({
        "model": adapter,
        "prompt": format!("request {n} for {adapter}"),
        "max_tokens": max_tokens,
    });
    http(
        port,
        "POST",
        "/v1/completions",
        &[],
        body.to_string().into_bytes(),
    )
    .await
    .status
}

/// Requests each pod has finished.
async fn served(pods: &[Bound]) -> Vec<f64> {
    let mut out = Vec::new();
    for p in pods {
        out.push(pod_counter(p, "vllm:request_success_total").await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_the_adapter_a_pod_runs() {
    let dir = scratch("lora");
    let stop = CancellationToken::new();
    let mut pods = Vec::new();
    for _ in 0..3 {
        pods.push(lora_pod(&stop).await);
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let list = endpoint_list(&addrs);
    let kvroute = Kvroute::start(
        &dir,
        &list,
        &[
            "--config-text",
            CONFIG,
            "--refresh-metrics-interval",
            "50ms",
        ],
    )
    .await;
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;

    // A long request for `a` (2,000 steps of ~7.5 ms) lands somewhere; find where it runs.
    let port = envoy.port;
    let long = tokio::spawn(async move { ask(port, "a", 0, 2000).await });
    let mut home = None;
    let found = eventually(Duration::from_secs(10), async || {
        for (i, p) in pods.iter().enumerate() {
            let reply =
                test_support::http::request(p.http, "GET", "/metrics", &[], Vec::new()).await;
            if reply.text().contains("running_lora_adapters=\"a\"") {
                home = Some(i);
                return true;
            }
        }
        false
    })
    .await;
    assert!(found, "the long request never ran");
    let home = home.unwrap();
    // Scraped by now (every 50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = served(&pods).await;
    for n in 1..=4 {
        assert_eq!(ask(envoy.port, "a", n, 2).await, 200);
    }
    let after_a = served(&pods).await;
    let per_pod: Vec<f64> = after_a.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(
        per_pod[home], 4.0,
        "requests for `a` go where `a` runs, though it is the busiest: {per_pod:?}"
    );

    for n in 5..=8 {
        assert_eq!(ask(envoy.port, "b", n, 2).await, 200);
    }
    let after_b = served(&pods).await;
    let per_pod: Vec<f64> = after_b.iter().zip(&after_a).map(|(a, b)| a - b).collect();
    assert_eq!(
        per_pod[home], 0.0,
        "requests for `b` avoid the pod whose one slot `a` holds: {per_pod:?}"
    );
    assert_eq!(per_pod.iter().sum::<f64>(), 4.0);
    long.abort();
    stop.cancel();
}
