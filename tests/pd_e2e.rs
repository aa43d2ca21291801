//! Prefill/decode disaggregation end to end: two prefill and two decode simulated pods
//! (labelled `llm-d.ai/role` in an endpoints file), the real `kvroute serve` with upstream's
//! P/D configuration (`disagg-profile-handler`, `prefix-based-pd-decider`), real Envoy in
//! front. A long prompt no decode pod holds is routed to a decode pod with
//! `x-prefiller-host-port` naming a prefill pod, whose sidecar has it prefilled there; a
//! short prompt, or one the decode pod already holds, is served whole by a decode pod; a
//! prefill header a client sends never reaches a pod.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::net::SocketAddr;

use harness::*;
use kvroute_sim::server::{Bound, PdConfig, Role};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: prefill
  plugins:
  - {pluginRef: prefill-filter}
  - {pluginRef: max-score-picker}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
- name: decode
  plugins:
  - {pluginRef: decode-filter}
  - {pluginRef: max-score-picker}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
";

/// A completion of `prompt` through Envoy (with `headers`): its status and the prefill pod
/// that computed it, if one did.
async fn complete(envoy: &Envoy, prompt: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": true});
    let reply = http(
        envoy.port,
        "POST",
        "/v1/completions",
        headers,
        body.to_string().into_bytes(),
    )
    .await;
    assert!(
        reply.status != 200 || reply.text().ends_with("data: [DONE]\n\n"),
        "{}",
        reply.text()
    );
    (reply.status, reply.header("x-sim-prefilled-by").to_owned())
}

/// Tokens a pod generated (`vllm:generation_tokens_total`).
async fn generated(pod: &Bound) -> f64 {
    pod_counter(pod, "vllm:generation_tokens_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_cold_prompts_are_prefilled_on_a_prefill_pod_and_decoded_on_a_decode_pod() {
    let dir = scratch("pd");
    let stop = CancellationToken::new();
    let mut pods = Vec::new();
    for role in [Role::Prefill, Role::Prefill, Role::Decode, Role::Decode] {
        let pd = PdConfig {
            role,
            ..PdConfig::default()
        };
        pods.push(
            sim_pod_pd(1, [0, 0, 0], 100.0, pd, stop.child_token())
                .await
                .unwrap(),
        );
    }
    let (prefill, decode) = pods.split_at(2);
    let endpoints: String = pods
        .iter()
        .zip(["prefill", "prefill", "decode", "decode"])
        .map(|(p, role)| {
            format!(
                "- {{address: \"{}\", labels: {{llm-d.ai/role: {role}}}}}\n",
                p.http
            )
        })
        .collect();
    let endpoints_file = dir.join("endpoints.yaml");
    std::fs::write(&endpoints_file, format!("endpoints:\n{endpoints}")).unwrap();
    let config_file = dir.join("pd.yaml");
    std::fs::write(&config_file, CONFIG).unwrap();
    let kvroute = Kvroute::start_files(&dir, &endpoints_file, &config_file).await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
    let prefill_addrs: Vec<String> = prefill.iter().map(|p| p.http.to_string()).collect();

    // Eight documents of about 1,000 tokens each, none cached anywhere: every one is
    // prefilled on a prefill pod.
    let docs: Vec<String> = (0..8)
        .map(|d| format!("{d:04} ") + &format!("Document {d} is about routing. ").repeat(130))
        .collect();
    let mut used = std::collections::HashSet::new();
    for doc in &docs {
        let (status, by) = complete(&envoy, &format!("{doc} Summarise it."), &[]).await;
        assert_eq!(status, 200);
        assert!(prefill_addrs.contains(&by), "prefilled by {by:?}");
        used.insert(by);
    }
    assert_eq!(used.len(), 2, "both prefill pods take prompts: {used:?}");
    // Each prefill pod generated one token per prompt it computed; the decode pods did the
    // rest, four tokens a request.
    let on_prefill = generated(&prefill[0]).await + generated(&prefill[1]).await;
    let on_decode = generated(&decode[0]).await + generated(&decode[1]).await;
    assert_eq!((on_prefill, on_decode), (8.0, 32.0));

    // The same documents with another question: the decode pod that decoded each holds it
    // now (kvroute recorded it on both pods), so they are served whole there.
    for doc in &docs {
        let (status, by) = complete(&envoy, &format!("{doc} List its key points."), &[]).await;
        assert_eq!((status, by.as_str()), (200, ""), "{doc:.20}");
    }
    // A short prompt is never worth moving, and a client cannot name a prefill pod.
    let (status, by) = complete(
        &envoy,
        "Hello there.",
        &[("x-prefiller-host-port", &prefill_addrs[0])],
    )
    .await;
    assert_eq!((status, by.as_str()), (200, ""));
    let on_prefill_after = generated(&prefill[0]).await + generated(&prefill[1]).await;
    assert_eq!(on_prefill_after, 8.0, "prefill pods served nothing more");
    let on_decode_after = generated(&decode[0]).await + generated(&decode[1]).await;
    assert_eq!(on_decode_after, 32.0 + 9.0 * 4.0);
    stop.cancel();
}
