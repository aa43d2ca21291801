use std::sync::Arc;

use kvroute_core::{Endpoint, Prompt, RequestHints};
use kvroute_endpoints::Registry;
use kvroute_index::{PrefixIndex, Shared, Tier};
use kvroute_tokens::{BlockHasher, ExtraKeys};

use super::*;
use crate::test_util::{registry, request};
use crate::{BodyUse, SchedulingRequest};

fn precise_ctx(block_size: usize) -> BuildContext {
    let mut ctx = BuildContext::new(block_size);
    ctx.precise_index = Some(Arc::new(Shared::new(PrefixIndex::new())));
    ctx
}

fn build(yaml: &str, ctx: &BuildContext) -> Result<Scheduler, ConfigError> {
    EndpointPickerConfig::load(yaml, ctx)
}

/// Every example configuration of upstream's docs and deploy folders (pinned under
/// `tests/upstream/`, each naming its source) either builds or is refused with an error
/// that names what is wrong and where: the unknown plugin type and its line, or the
/// parameter and its line.
#[test]
fn upstream_examples_load_or_name_the_plugin_and_line() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstream");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Source: "), "{}", path.display());
        match build(&text, &precise_ctx(16)) {
            Ok(_) => loaded.push(path.file_name().unwrap().to_string_lossy().into_owned()),
            // The one file whose fault is not in a line: a whole-document version mismatch.
            Err(ConfigError::ApiVersion(v)) => assert_eq!(v, "config.x-k8s.io/v1alpha1"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("line "), "{}: {msg}", path.display());
            }
        }
    }
    loaded.sort();
    // The configurations of the plugins kvroute implements load unchanged.
    for expected in [
        "llm-d-router__deploy__config__epp-config.yaml",
        "llm-d-router__deploy__config__sim-epp-config.yaml",
        "llm-d-router__deploy__config__epp-estimate-prefix-cache-config.yaml",
        "llm-d-router__deploy__config__sim-epp-kvcache-config.yaml",
        "llm-d-router__deploy__config__sim-epp-tokenizer-vllm-http-config.yaml",
        "llm-d-router__config__charts__routerlib__templates___config__default-plugins_yaml.yaml",
        "gateway-api-inference-extension__config__charts__epplib__templates___config__default-plugins_yaml.yaml",
        "llm-d-router__docs__create_new_filter__block1.yaml",
        "llm-d-router__deploy__config__pd-epp-config.yaml",
        "llm-d-router__deploy__config__sim-pd-epp-config.yaml",
        "llm-d-router__docs__disaggregation__block1.yaml",
        "gateway-api-inference-extension__site-src__guides__epp-configuration__config-text__block4.yaml",
        "gateway-api-inference-extension__site-src__guides__epp-configuration__config-text__block5.yaml",
        "gateway-api-inference-extension__site-src__guides__flow-control__block2.yaml",
    ] {
        assert!(
            loaded.iter().any(|l| l == expected),
            "{expected}: {loaded:?}"
        );
    }
}

#[test]
fn an_unknown_type_or_parameter_is_named_with_its_line() {
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefix-cache-scorer\n- type: no-such-scorer\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(
        err.contains("no-such-scorer") && err.contains("line 5"),
        "{err}"
    );
    let yaml = "plugins:\n- type: max-score-picker\n  parameters:\n    maxNumOfEndpoint: 2\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(
        err.contains("maxNumOfEndpoint") && err.contains("line 4"),
        "{err}"
    );
    let yaml = "plugins:\n- parameters: {lruCapacityPerServer: x}\n  type: prefix-cache-scorer\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(err.contains("prefix-cache-scorer parameters"), "{err}");
    let err = build("apiVersion: v9\n", &precise_ctx(16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("apiVersion"), "{err}");
}

#[test]
fn references_are_checked() {
    let yaml = "plugins:\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: nope}\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(err.contains("\"nope\""), "{err}");
    let yaml = "plugins:\n- type: max-score-picker\n- type: ttft-scorer\n  parameters: {producers: [max-score-picker]}\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(err.contains("not a prefix producer"), "{err}");
    let yaml = "plugins:\n- type: max-score-picker\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: missing}]\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(err.contains("\"missing\""), "{err}");
    let yaml = "plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]\n";
    assert!(matches!(
        build(yaml, &precise_ctx(16)),
        Err(ConfigError::At { error, .. }) if matches!(*error, ConfigError::TwoPickers(_))
    ));
    let yaml = "plugins:\n- {type: prefix-cache-scorer, name: a}\n- {type: load-scorer, name: a}\n";
    assert!(matches!(
        build(yaml, &precise_ctx(16)),
        Err(ConfigError::At { error, .. }) if matches!(*error, ConfigError::DuplicateName(_))
    ));
    // Precise matching needs the pods' events.
    let err = build(DEFAULT_PRECISE, &BuildContext::new(16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--kv-events-port"), "{err}");
}

/// The request path reads a body only for plugins that need one, and tokenizes only for
/// the precise ones; an unlisted producer still counts when a listed scorer reads it.
#[test]
fn a_scheduler_knows_what_of_the_body_its_plugins_need() {
    let ctx = precise_ctx(16);
    let need = |yaml: &str| build(yaml, &ctx).unwrap().body_use();
    assert_eq!(need(LEAST_IN_FLIGHT), BodyUse::None);
    assert_eq!(need(DEFAULT_APPROX), BodyUse::Parsed);
    assert_eq!(need(DEFAULT_PRECISE), BodyUse::Tokenized);
    assert_eq!(
        need("plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\n"),
        BodyUse::None
    );
    assert_eq!(
        need("plugins:\n- type: lora-affinity-scorer\n"),
        BodyUse::Parsed
    );
    assert_eq!(
        need(
            "plugins:\n- {type: precise-prefix-cache-producer, name: p}\n- type: ttft-scorer\n  parameters: {producers: [p]}\nschedulingProfiles:\n- name: default\n  plugins: [{pluginRef: ttft-scorer}]\n"
        ),
        BodyUse::Tokenized
    );
    // Upstream's style: the precise scorer with its own producer.
    assert_eq!(
        need("plugins:\n- type: precise-prefix-cache-scorer\n"),
        BodyUse::Tokenized
    );
    // The TTFT scorer estimates the prompt from its text when no producer is named; the
    // no-hit LRU scorer needs to know whether a request has a prompt.
    assert_eq!(
        need("plugins:\n- type: ttft-scorer\n  parameters: {producers: []}\n"),
        BodyUse::Parsed
    );
    assert_eq!(
        need("plugins:\n- type: no-hit-lru-scorer\n"),
        BodyUse::Parsed
    );
    assert_eq!(Scheduler::least_in_flight(0).body_use(), BodyUse::None);
}

#[test]
fn the_shipped_defaults_build_and_omitted_parts_get_upstreams_defaults() {
    for text in [DEFAULT_APPROX, DEFAULT_PRECISE, LEAST_IN_FLIGHT] {
        let s = build(text, &precise_ctx(16)).unwrap();
        assert_eq!(s.profiles().len(), 1);
    }
    // No profiles: one "default" of every filter, scorer and picker; no picker: max-score.
    let s = build(
        "plugins:\n- type: decode-filter\n- type: load-scorer\n",
        &precise_ctx(16),
    )
    .unwrap();
    let types: Vec<(&str, Option<f64>)> = s.profiles()[0]
        .plugins()
        .map(|(p, w)| (p.type_name(), w))
        .collect();
    assert_eq!(
        types,
        [
            ("decode-filter", None),
            ("load-scorer", Some(1.0)),
            ("max-score-picker", None)
        ]
    );
}

fn route(s: &Scheduler, reg: &Registry, prompt: &str) -> u16 {
    let req = request(Prompt::Text(prompt.into()));
    let hints = RequestHints::default();
    let d = s
        .schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
        .unwrap();
    d.primary().address().port()
}

#[test]
fn a_shared_prefix_goes_home_and_departed_endpoints_are_pruned() {
    let ctx = BuildContext::new(16);
    let s = build(DEFAULT_APPROX, &ctx).unwrap();
    let reg = registry(4);
    let system = "You are a helpful assistant. ".repeat(40);
    let home = route(&s, &reg, &format!("{system} first question"));
    for q in ["second", "third", "fourth"] {
        assert_eq!(route(&s, &reg, &format!("{system} {q} question")), home);
    }
    // A reload keeps what the approximate index learnt.
    let reloaded = build(DEFAULT_APPROX, &ctx).unwrap();
    assert_eq!(route(&reloaded, &reg, &format!("{system} fifth")), home);
    let index = &ctx.approx_indexes()[0];
    let held = |port: u16| {
        let id = kvroute_core::EndpointId::new(format!("127.0.0.1:{port}"));
        index.read().index().endpoint_blocks(&id)
    };
    assert!(held(home) > 0);
    let departed = [kvroute_core::EndpointId::new(format!("127.0.0.1:{home}"))];
    let others: Vec<Endpoint> = (1..=4)
        .filter(|&p| p != home)
        .map(|p| Endpoint::from_address(([127, 0, 0, 1], p).into()))
        .collect();
    reg.replace(others);
    reloaded.endpoints_changed(&reg.snapshot(), &departed);
    assert_eq!(held(home), 0, "the departed endpoint's entries are gone");
}

#[test]
fn auto_tune_sizes_each_endpoints_memory_from_its_pods_kv_capacity() {
    for (auto_tune, want) in [("true", 4096), ("false", 31_250)] {
        let ctx = BuildContext::new(16);
        let yaml = format!(
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {{autoTune: {auto_tune}}}\n"
        );
        let s = build(&yaml, &ctx).unwrap();
        let reg = registry(1);
        // The pod caches 65,536 tokens: 4,096 chunks of 16 tokens.
        reg.snapshot()[0].set_kv_capacity_tokens(65_536);
        route(&s, &reg, &"You are a helpful assistant. ".repeat(10));
        let index = &ctx.approx_indexes()[0];
        let id = reg.snapshot()[0].id().clone();
        assert_eq!(index.read().capacity_of(&id), want, "autoTune {auto_tune}");
    }
}

/// A pod whose answers say its tokenizer makes 2 bytes of text a token holds half the text
/// a 4-byte estimate would have it hold: `autoTune` sizes the index's memory of it by what
/// the pod reports (else by the configured capacity, read as tokens), at the learnt rate.
#[test]
fn auto_tune_reads_the_pods_bytes_per_token_once_learnt() {
    // 65,536 tokens at 2 bytes: 2,048 chunks of 64 bytes; 31,250 blocks of 16 tokens at 2
    // bytes: 15,625.
    for (capacity, want) in [(Some(65_536), 2_048), (None, 15_625)] {
        let ctx = BuildContext::new(16);
        let s = build("plugins:\n- type: prefix-cache-scorer\n", &ctx).unwrap();
        let reg = registry(1);
        let ep = reg.snapshot()[0].clone();
        if let Some(tokens) = capacity {
            ep.set_kv_capacity_tokens(tokens);
        }
        for _ in 0..4 {
            ep.observe_answer(2_000, Some(1_000));
        }
        assert_eq!(ep.prompt_bytes_per_token(), Some(2.0));
        route(&s, &reg, &"You are a helpful assistant. ".repeat(10));
        let index = &ctx.approx_indexes()[0];
        assert_eq!(index.read().capacity_of(ep.id()), want, "{capacity:?}");
    }
}

#[test]
fn a_preview_decides_as_schedule_would_and_remembers_nothing() {
    let ctx = BuildContext::new(16);
    let s = build(DEFAULT_APPROX, &ctx).unwrap();
    let reg = registry(4);
    let system = "You are a helpful assistant. ".repeat(40);
    let req = request(Prompt::Text(format!("{system} first question")));
    let hints = RequestHints::default();
    let sreq = SchedulingRequest::new(Some(&req), &hints);
    let preview = |s: &Scheduler| {
        s.preview(&sreq, &reg.snapshot())
            .unwrap()
            .primary()
            .address()
    };
    // Nothing learnt and the tie-breaking turn unmoved: previews agree with each other and
    // with the decision that follows.
    let first = preview(&s);
    assert_eq!(preview(&s), first);
    let index = &ctx.approx_indexes()[0];
    let total = || {
        (1..=4)
            .map(|p| {
                let id = kvroute_core::EndpointId::new(format!("127.0.0.1:{p}"));
                index.read().index().endpoint_blocks(&id)
            })
            .sum::<usize>()
    };
    assert_eq!(total(), 0, "a preview records nothing");
    let decided = s
        .schedule(&sreq, &reg.snapshot())
        .unwrap()
        .primary()
        .address();
    assert_eq!(decided, first);
    assert!(total() > 0, "a decision records the prompt");
    // What the decision learnt, a preview of the next turn sees.
    let next = request(Prompt::Text(format!("{system} second question")));
    let next = SchedulingRequest::new(Some(&next), &hints);
    assert_eq!(
        s.preview(&next, &reg.snapshot())
            .unwrap()
            .primary()
            .address(),
        first
    );
}

#[test]
fn the_ttft_scorer_weighs_queued_prefill_against_what_is_cached() {
    let ctx = precise_ctx(4);
    let index = Arc::clone(ctx.precise_index.as_ref().unwrap());
    let yaml = "plugins:\n- type: precise-prefix-cache-producer\n- type: ttft-scorer\n  parameters: {producers: [precise-prefix-cache-producer]}\n";
    let s = build(yaml, &ctx).unwrap();
    let eps = registry(3).snapshot();
    eps.iter().for_each(|e| e.set_events_confirmed(true));
    let tokens: Vec<u32> = (0..40).collect();
    let mut hashes = Vec::new();
    BlockHasher::new(4).hash_tokens(&tokens, &ExtraKeys::default(), &mut hashes);
    // Endpoint 0 holds 8 of 10 blocks but has 100 tokens of prefill queued; endpoint 1 holds
    // nothing and is idle; endpoint 2 holds 4 blocks with 10 queued: predicted 109, 41, 35.
    index.write().store(eps[0].id(), &hashes[..8], Tier::Gpu);
    index.write().store(eps[2].id(), &hashes[..4], Tier::Gpu);
    let _busy = eps[0].acquire_with_prefill(100);
    let _some = eps[2].acquire_with_prefill(10);
    let req = request(Prompt::Tokens(tokens));
    let hints = RequestHints::default();
    let d = s
        .schedule(&SchedulingRequest::new(Some(&req), &hints), &eps)
        .unwrap();
    assert!(Arc::ptr_eq(d.primary(), &eps[2]));
    assert_eq!(d.prefill_tokens(), 24, "40 tokens, 16 cached there");
    // Counting the work each choice adds six times (workWeight 5): 100 + 6 x 8 = 148 at
    // endpoint 0, 10 + 6 x 24 = 154 at endpoint 2, 240 at endpoint 1.
    let weighted = build(
        &yaml.replace("producers:", "workWeight: 5, producers:"),
        &ctx,
    )
    .unwrap();
    let d = weighted
        .schedule(&SchedulingRequest::new(Some(&req), &hints), &eps)
        .unwrap();
    assert!(Arc::ptr_eq(d.primary(), &eps[0]));
    for bad in ["-1", ".nan"] {
        let refused = build(
            &yaml.replace("producers:", &format!("workWeight: {bad}, producers:")),
            &ctx,
        );
        assert!(
            refused.is_err_and(|e| e.to_string().contains("workWeight")),
            "{bad}"
        );
    }
}

#[test]
fn filters_select_by_label() {
    let reg = Registry::new();
    let ep = |port: u16, role: Option<&str>| {
        let mut e = Endpoint::from_address(([127, 0, 0, 1], port).into());
        if let Some(r) = role {
            e.labels.insert("llm-d.ai/role".into(), r.into());
        }
        e.labels.insert("zone".into(), format!("z{}", port % 2));
        e
    };
    reg.replace(vec![
        ep(1, Some("prefill")),
        ep(2, Some("decode")),
        ep(3, None),
        ep(4, Some("both")),
    ]);
    let ports = |yaml: &str| -> Vec<u16> {
        let s = build(yaml, &precise_ctx(16)).unwrap();
        let hints = RequestHints::default();
        let mut seen: Vec<u16> = (0..16)
            .map(|_| {
                s.schedule(&SchedulingRequest::new(None, &hints), &reg.snapshot())
                    .unwrap()
                    .primary()
                    .address()
                    .port()
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    };
    assert_eq!(ports("plugins: [{type: decode-filter}]"), [2, 3, 4]);
    assert_eq!(ports("plugins: [{type: prefill-filter}]"), [1, 4]);
    assert_eq!(
        ports(
            "plugins:\n- type: label-selector-filter\n  parameters:\n    matchLabels: {zone: z0}\n    matchExpressions: [{key: llm-d.ai/role, operator: NotIn, values: [decode]}]\n"
        ),
        [4]
    );
    let s = build(
        "plugins: [{type: label-selector-filter, parameters: {matchLabels: {zone: none}}}]",
        &precise_ctx(16),
    )
    .unwrap();
    let hints = RequestHints::default();
    assert_eq!(
        s.schedule(&SchedulingRequest::new(None, &hints), &reg.snapshot())
            .unwrap_err(),
        crate::ScheduleError::AllFiltered
    );
}

#[test]
fn feature_gates_are_upstreams_and_listed() {
    let c = EndpointPickerConfig::parse("featureGates: [flowControl, dataLayer=false]\n").unwrap();
    assert_eq!(c.feature_gates().collect::<Vec<_>>(), ["flowControl"]);
    let err = EndpointPickerConfig::parse("featureGates:\n- flowControl\n- nope\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("line 2"), "{err}");
}

#[test]
fn building_errors_name_their_line() {
    let yaml = "plugins:\n- type: max-score-picker\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: missing\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(
        err.starts_with("line 6:") && err.contains("\"missing\""),
        "{err}"
    );
    let yaml = "plugins:\n- type: load-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - {pluginRef: load-scorer, weight: -2}\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(
        err.starts_with("line 6:") && err.contains("weight -2"),
        "{err}"
    );
    let yaml = "plugins:\n- type: load-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - {pluginRef: load-scorer, weight: .nan}\n";
    assert!(build(yaml, &precise_ctx(16)).is_err());
    let yaml = "plugins:\n- type: prefix-cache-scorer\n- name: p\n  type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 0}\n";
    let err = build(yaml, &precise_ctx(16)).unwrap_err().to_string();
    assert!(
        err.starts_with("line 3:") && err.contains("at least 1"),
        "{err}"
    );
}

/// One configuration naming every built-in type with every parameter it takes, as upstream
/// spells them (parameters from upstream's example configurations and plugin sources).
#[test]
fn every_builtin_type_and_parameter_loads() {
    let yaml = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: token-producer
  parameters: {modelName: m, vllm: {url: "http://localhost:8000"}}
- type: approx-prefix-cache-producer
  parameters: {autoTune: false, blockSizeTokens: 16, maxPrefixTokensToMatch: 1280, lruCapacityPerServer: 31250}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSize: 16, hashSeed: "42"}
    kvEventsConfig: {zmqEndpoint: "tcp://0.0.0.0:5557"}
    indexerConfig: {kvBlockIndexConfig: {enableMetrics: false}}
    speculativeIndexing: false
    speculativeTTL: 2s
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer, matchLengthWeight: 0.5, matchLengthScaleTokens: 4096}
- name: old-style
  type: prefix-cache-scorer
  parameters: {blockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- type: precise-prefix-cache-scorer
- type: queue-scorer
- type: running-requests-size-scorer
- type: kv-cache-utilization-scorer
- type: load-aware-scorer
  parameters: {threshold: 64}
- type: lora-affinity-scorer
- type: active-request-scorer
  parameters: {requestTimeout: 2m, idleThreshold: 1, maxBusyScore: 0.9, inFlightLoadProducerName: x}
- type: no-hit-lru-scorer
  parameters: {lruSize: 2048, prefixMatchInfoProducerName: approx-prefix-cache-producer, prefixPluginType: a, prefixPluginName: b}
- type: ttft-scorer
  parameters: {producers: [approx-prefix-cache-producer]}
- type: session-affinity-scorer
  parameters: {strategy: encoded_endpoint_header, encodedEndpointHeaderConfig: {header: x-session-token}, profileName: default}
- name: by-session-id
  type: session-affinity-scorer
  parameters:
    strategy: session_id
    sessionIdConfig: {sources: [{header: x-session-id}], evictionTtlSeconds: 300, evictionSweepSeconds: 10}
- type: session-affinity-filter
  parameters: {strategy: session_id, sessionIdConfig: {evictionTtlSeconds: 60}}
- type: load-scorer
  parameters: {headroom: 4}
- type: prefix-replication-filter
  parameters: {minRequests: 4, halfLife: 10s, minAge: 2s, memoryShare: 0.25, maxCopies: 2}
- type: label-selector-filter
  parameters: {matchLabels: {a: b}, matchExpressions: [{key: c, operator: Exists}]}
- type: decode-filter
- type: prefill-filter
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 2}
- type: random-picker
  parameters: {maxNumOfEndpoints: 1}
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 1}
- type: metrics-data-source
  parameters: {scheme: http, path: /metrics, insecureSkipVerify: true}
- type: core-metrics-extractor
  parameters: {defaultEngine: vllm, engineLabelKey: llm-d.ai/engine-type}
- type: utilization-detector
  parameters: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 200ms, headroom: 0.1, inFlightLoadProducerName: x}
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: decode-filter}
  - {pluginRef: session-affinity-filter}
  - {pluginRef: prefix-replication-filter}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: old-style, weight: 1}
  - {pluginRef: precise-prefix-cache-scorer}
  - {pluginRef: queue-scorer}
  - {pluginRef: running-requests-size-scorer}
  - {pluginRef: kv-cache-utilization-scorer}
  - {pluginRef: load-aware-scorer}
  - {pluginRef: lora-affinity-scorer}
  - {pluginRef: active-request-scorer}
  - {pluginRef: no-hit-lru-scorer}
  - {pluginRef: ttft-scorer}
  - {pluginRef: session-affinity-scorer}
  - {pluginRef: by-session-id}
  - {pluginRef: load-scorer}
  - {pluginRef: weighted-random-picker}
"#;
    let config = EndpointPickerConfig::parse(yaml).unwrap();
    assert_eq!(config.metrics_path(), Some("/metrics"));
    let s = config.build(&precise_ctx(16)).unwrap();
    let scorers = s.profiles()[0]
        .plugins()
        .filter(|(_, w)| w.is_some())
        .count();
    assert_eq!(scorers, 14);
    // It schedules: every scorer runs over endpoints with no scrapes, no cache, no load.
    let reg = registry(4);
    let req = request(Prompt::Tokens((0..64).collect()));
    let hints = RequestHints::default();
    let d = s
        .schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
        .unwrap();
    assert_eq!(d.fallbacks().len(), 1, "weighted-random-picker returns two");
    // Disaggregation's handler and deciders are covered by the P/D tests below.
    let pd = [PD, "type: always-disagg-pd-decider", DEFAULT_PD].concat();
    for t in PluginType::ALL {
        assert!(
            yaml.contains(&format!("type: {}", t.as_str()))
                || pd.contains(&format!("type: {}", t.as_str())),
            "{t} is not in this test"
        );
    }
}

#[test]
fn failing_endpoints_are_scored_down_then_left_out_unless_nothing_else_is_left() {
    let s = Scheduler::least_in_flight(0);
    let reg = registry(3);
    let eps = reg.snapshot();
    let hints = RequestHints::default();
    let pick = || {
        let d = s
            .schedule(&SchedulingRequest::new(None, &hints), &eps)
            .unwrap();
        d.primary().address().port()
    };
    let now = std::time::Instant::now();
    // One failure: degraded (its total is scaled down; it still gets its turn among equals,
    // so it either recovers or reaches the threshold).
    eps[0].record_outcome(false, now);
    assert!(matches!(
        eps[0].health(now),
        kvroute_endpoints::Health::Degraded(_)
    ));
    // Ejected: never picked while others remain, even when they are busier.
    for _ in 0..5 {
        eps[0].record_outcome(false, now);
    }
    let busy = [eps[1].acquire(), eps[2].acquire()];
    assert!((0..6).all(|_| pick() != 1));
    drop(busy);
    // Every endpoint ejected: all are candidates again (Envoy's panic threshold).
    for ep in &eps[1..] {
        for _ in 0..6 {
            ep.record_outcome(false, now);
        }
    }
    let mut seen: Vec<u16> = (0..9).map(|_| pick()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, [1, 2, 3]);
}

/// A pool of two prefill pods (ports 1, 2) and two decode pods (3, 4).
fn pd_pool() -> Registry {
    let reg = Registry::new();
    let ep = |port: u16, role: &str| {
        let mut e = Endpoint::from_address(([127, 0, 0, 1], port).into());
        e.labels.insert("llm-d.ai/role".into(), role.into());
        e
    };
    reg.replace(vec![
        ep(1, "prefill"),
        ep(2, "prefill"),
        ep(3, "decode"),
        ep(4, "decode"),
    ]);
    reg
}

const PD: &str = "
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false}
- type: prefix-cache-scorer
- type: load-scorer
- type: prefill-filter
- type: decode-filter
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: load-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: load-scorer}]
";

/// Upstream's P/D: decode routes every request; a prompt whose uncached part on that decode
/// pod reaches `nonCachedTokens` is computed on a prefill pod first, and a prompt the decode
/// pod holds (its blocks were recorded on both pods) is not.
#[test]
fn disaggregation_prefills_long_uncached_prompts_on_a_prefill_pod() {
    let reg = pd_pool();
    let s = build(PD, &BuildContext::new(16)).unwrap();
    assert_eq!(s.body_use(), BodyUse::Parsed);
    let hints = RequestHints::default();
    let decide = |text: String| {
        let req = request(Prompt::Text(text));
        s.schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
            .unwrap()
    };
    let port = |e: &kvroute_endpoints::EndpointState| e.address().port();
    // 4,000 bytes: about 1,000 tokens, none cached anywhere.
    let long = "a document about routing. ".repeat(160);
    let d = decide(format!("{long} first"));
    assert!([3, 4].contains(&port(d.primary())));
    let (prefill, tokens) = d.prefill().expect("a long cold prompt is disaggregated");
    assert!([1, 2].contains(&port(prefill)));
    assert!(tokens > 900, "{tokens}");
    assert_eq!(d.prefill_tokens(), 0, "the decode pod computes none of it");
    // The same document again: the decode pod holds it now, so it routes there whole.
    let again = decide(format!("{long} second"));
    assert_eq!(port(again.primary()), port(d.primary()));
    assert!(again.prefill().is_none(), "{again:?}");
    assert!(again.prefill_tokens() < 256);
    // A short prompt is never worth moving.
    assert!(decide("hello there".into()).prefill().is_none());
}

/// Without a prefill decider upstream's handler never disaggregates, and a decider that is
/// off (`nonCachedTokens: 0`) never approves.
#[test]
fn disaggregation_needs_a_decider_that_is_on() {
    let reg = pd_pool();
    let hints = RequestHints::default();
    let long = "a document about routing. ".repeat(160);
    let req = request(Prompt::Text(long));
    for yaml in [
        PD.replace(
            "    deciders: {prefill: prefix-based-pd-decider}\n",
            "    {}\n",
        ),
        PD.replace("nonCachedTokens: 256", "nonCachedTokens: 0"),
    ] {
        let s = build(&yaml, &BuildContext::new(16)).unwrap();
        let d = s
            .schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
            .unwrap();
        assert!([3, 4].contains(&d.primary().address().port()), "{yaml}");
        assert!(d.prefill().is_none(), "{yaml}");
    }
    let always = PD
        .replace(
            "prefix-based-pd-decider\n  parameters: {nonCachedTokens: 256}",
            "always-disagg-pd-decider",
        )
        .replace(
            "prefill: prefix-based-pd-decider",
            "prefill: always-disagg-pd-decider",
        );
    let s = build(&always, &BuildContext::new(16)).unwrap();
    let short = request(Prompt::Text("hi".into()));
    let d = s
        .schedule(
            &SchedulingRequest::new(Some(&short), &hints),
            &reg.snapshot(),
        )
        .unwrap();
    assert!(d.prefill().is_some(), "{always}");
}

/// With no prefill pod, the request fails unless a fallback profile routes it whole.
#[test]
fn a_prefill_stage_without_pods_fails_or_falls_back() {
    let reg = Registry::new();
    let mut e = Endpoint::from_address(([127, 0, 0, 1], 3).into());
    e.labels.insert("llm-d.ai/role".into(), "decode".into());
    reg.replace(vec![e]);
    let hints = RequestHints::default();
    let req = request(Prompt::Text("a document about routing. ".repeat(160)));
    let s = build(PD, &BuildContext::new(16)).unwrap();
    assert_eq!(
        s.schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
            .unwrap_err(),
        crate::ScheduleError::AllFiltered
    );
    let with_fallback = PD.replace(
        "    deciders: {prefill: prefix-based-pd-decider}",
        "    deciders: {prefill: prefix-based-pd-decider}\n    profiles: {fallback: whole}",
    ) + "- name: whole\n  plugins: [{pluginRef: load-scorer}]\n";
    let s = build(&with_fallback, &BuildContext::new(16)).unwrap();
    let d = s
        .schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
        .unwrap();
    assert_eq!(d.primary().address().port(), 3);
    assert!(d.prefill().is_none());
    assert!(d.prefill_tokens() > 900, "the decode pod computes it all");
}

#[test]
fn a_wrong_disaggregation_configuration_is_refused_with_its_reason() {
    let err = |yaml: &str| build(yaml, &BuildContext::new(16)).unwrap_err().to_string();
    let e = err(&PD.replace(
        "prefill: prefix-based-pd-decider",
        "prefill: no-such-decider",
    ));
    assert!(e.contains("no-such-decider"), "{e}");
    let e = err(&PD.replace("prefill: prefix-based-pd-decider", "prefill: load-scorer"));
    assert!(e.contains("load-scorer") && e.contains("decider"), "{e}");
    let e = err(&PD.replace("- name: decode", "- name: other"));
    assert!(
        e.contains("\"decode\"") && e.contains("disagg-profile-handler"),
        "{e}"
    );
    let e = err(&PD.replace("- name: prefill", "- name: other"));
    assert!(e.contains("\"prefill\""), "{e}");
    let e = err(&PD.replace(
        "    deciders: {prefill: prefix-based-pd-decider}",
        "    stageOrder: prefill-first\n    deciders: {prefill: prefix-based-pd-decider}",
    ));
    assert!(e.contains("decode-first") && e.contains("line "), "{e}");
    let e = err(&PD.replace(
        "    deciders: {prefill: prefix-based-pd-decider}",
        "    deciders: {prefill: prefix-based-pd-decider, encode: always-disagg-multimodal-decider}",
    ));
    assert!(e.contains("encode"), "{e}");
    let e = err(&PD.replace("nonCachedTokens: 256", "nonCachedTokens: -1"));
    assert!(e.contains("nonCachedTokens") && e.contains("line "), "{e}");
}

/// kvroute's `ttft-pd-decider` (the shipped P/D profile's): a long cold prompt moves to an
/// idle prefill pod, and stays on its decode pod when every prefill pod has more than
/// `maxTtftRatio` times the decode pod's predicted wait queued.
#[test]
fn the_ttft_decider_keeps_prompts_home_when_prefill_pods_fall_behind() {
    let reg = pd_pool();
    let s = build(DEFAULT_PD, &BuildContext::new(16)).unwrap();
    let hints = RequestHints::default();
    let decide = |text: String| {
        let req = request(Prompt::Text(text));
        s.schedule(&SchedulingRequest::new(Some(&req), &hints), &reg.snapshot())
            .unwrap()
    };
    // About 3,000 tokens, over the 2,048-token threshold.
    let doc = |n: usize| format!("{n:04} ") + &"a long document on routing. ".repeat(440);
    let d = decide(doc(0));
    let (prefill, _) = d
        .prefill()
        .expect("idle prefill pods take a long cold prompt");
    assert!([1, 2].contains(&prefill.address().port()));
    // Both prefill pods now have 10 prompts of that size queued, the decode pods none.
    let held: Vec<_> = reg
        .snapshot()
        .iter()
        .filter(|e| e.address().port() <= 2)
        .map(|e| e.acquire_with_prefill(30_000))
        .collect();
    let d = decide(doc(1));
    assert!(d.prefill().is_none(), "{d:?}");
    assert!(d.prefill_tokens() > 2_048, "computed where it decodes");
    drop(held);
    assert!(decide(doc(2)).prefill().is_some());
    // Its parameters are checked.
    for (bad, what) in [
        ("maxTtftRatio: 1.5", "maxTtftRatio: 0"),
        ("nonCachedTokens: 2048", "nonCachedTokens: -5"),
    ] {
        let e = build(&DEFAULT_PD.replace(bad, what), &BuildContext::new(16))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(what.split(':').next().unwrap()) && e.contains("line "),
            "{e}"
        );
    }
}

/// `session-affinity-filter` reads the scorer's parameters and refuses what kvroute cannot
/// honour the same way.
#[test]
fn the_session_filter_is_configured_as_the_scorer_is() {
    let ctx = BuildContext::new(16);
    let with = |params: &str| {
        build(
            &format!(
                "plugins:\n- type: session-affinity-filter\n  parameters: {params}\n- type: queue-scorer\n"
            ),
            &ctx,
        )
    };
    let s = with("{}").unwrap();
    assert_eq!(s.body_use(), BodyUse::None, "the token is a header");
    with("{headerName: x-session-token}").expect("the earlier releases' parameter");
    for bad in [
        "{strategy: cookie}",
        "{encodedEndpointHeaderConfig: {header: x-other}}",
        "{strategy: session_id, sessionIdConfig: {sources: [{attribute: agent}]}}",
        "{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: 0}}",
        "{headerName: x-other}",
    ] {
        let err = with(bad).unwrap_err().to_string();
        assert!(err.contains("session-affinity-filter"), "{bad}: {err}");
    }
}

/// Precise matching weighs each held block by its best tier with upstream's default
/// `kvCacheBackendConfigs` (GPU 1.0, CPU 0.8): a prompt held in CPU memory only ranks
/// below the same prompt held in GPU memory and above no hit; configured weights apply by
/// medium name, and conflicting or invalid ones are refused.
#[test]
fn precise_hits_are_weighed_by_tier_as_upstreams_backend_configs() {
    let ctx = precise_ctx(4);
    let index = Arc::clone(ctx.precise_index.as_ref().unwrap());
    let eps = registry(4).snapshot();
    eps.iter().for_each(|e| e.set_events_confirmed(true));
    let tokens: Vec<u32> = (0..40).collect();
    let mut hashes = Vec::new();
    BlockHasher::new(4).hash_tokens(&tokens, &ExtraKeys::default(), &mut hashes);
    // 0: nothing; 1: all in CPU; 2: all in GPU; 3: all on disk (a medium with no entry).
    index.write().store(eps[1].id(), &hashes, Tier::Cpu);
    index.write().store(eps[2].id(), &hashes, Tier::Gpu);
    index.write().store(eps[3].id(), &hashes, Tier::Disk);
    let req = request(Prompt::Tokens(tokens));
    let hints = RequestHints::default();
    let order = |backends: &str| {
        let yaml = format!(
            "plugins:\n- type: precise-prefix-cache-scorer\n  parameters: {{indexerConfig: {{kvBlockIndexConfig: {{enableMetrics: false}}{backends}}}}}\n- type: max-score-picker\n  parameters: {{maxNumOfEndpoints: 4}}\n"
        );
        let d = build(&yaml, &ctx)
            .unwrap()
            .schedule(&SchedulingRequest::new(Some(&req), &hints), &eps)
            .unwrap();
        let mut order = vec![d.primary().address().port()];
        order.extend(d.fallbacks().iter().map(|e| e.address().port()));
        order
    };
    // Defaults: GPU and the unlisted medium (1.0) tie ahead, CPU (0.8) next, nothing last.
    let by_default = order("");
    assert_eq!(&by_default[2..], [2, 1], "{by_default:?}");
    let mut first: Vec<u16> = by_default[..2].to_vec();
    first.sort_unstable();
    assert_eq!(first, [3, 4]);
    // Configured by name (upstream writes them lower-case): CPU above GPU, disk at 0.
    assert_eq!(
        order(
            ", kvCacheBackendConfigs: [{name: gpu, weight: 0.5}, {name: cpu, weight: 0.9}, {name: disk, weight: 0}]"
        ),
        [2, 3, 1, 4]
    );
    for bad in [
        "[{name: cpu, weight: 0.8}, {name: lmcache-l1, weight: 0.5}]",
        "[{name: gpu, weight: -1}]",
        "[{name: gpu, weight: .nan}]",
    ] {
        let yaml = format!(
            "plugins:\n- type: precise-prefix-cache-scorer\n  parameters: {{indexerConfig: {{kvCacheBackendConfigs: {bad}}}}}\n"
        );
        let err = build(&yaml, &ctx).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("kvCacheBackendConfigs")),
            "{bad}: {err:?}"
        );
    }
}
