//! Precise routing's costs, with Qwen3's real tokenizer (`tests/run` fetches it into
//! `.cache/tokenizers/`, or set `KVROUTE_TEST_TOKENIZER`):
//!
//! - tokenization, cold: kvroute's `ModelTokenizer` (segment split, cache insert, block
//!   hashing) against the `tokenizers` crate alone on the same text;
//! - whole decisions through the ext_proc handler for 8k, 32k and 128k-token chat requests
//!   under `kvroute serve --kv-events-port …`'s profile, cold (a conversation never seen)
//!   and warm (all but the last message seen before); criterion's figures, then p50 / p99
//!   over repeated decisions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    missing_docs
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use kvroute_core::{ChatOptions, Prompt};
use kvroute_extproc::{ExtProcConfig, Metrics, Router, StreamState};
use kvroute_index::{PrefixIndex, Shared, Tier};
use kvroute_scheduler::config::DEFAULT_PRECISE;
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, SchedulerHandle, Tokenizers};
use kvroute_tokens::{BlockHasher, ExtraKeys, ModelTokenizer};
use test_support::envoy::{full_duplex_chat_headers, request_body};
use test_support::registry;

fn tokenizer_path() -> PathBuf {
    std::env::var_os("KVROUTE_TEST_TOKENIZER").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".cache/tokenizers/qwen3-3.7.2/tokenizer.json")
        },
        PathBuf::from,
    )
}

fn qwen3() -> ModelTokenizer {
    let path = tokenizer_path();
    let json = std::fs::read(&path).expect("Qwen3's tokenizer.json: run tests/run first");
    let config = std::fs::read(path.with_file_name("tokenizer_config.json")).unwrap();
    ModelTokenizer::new(&json, Some(&config)).unwrap()
}

/// Prose of about `tokens` Qwen3 tokens, distinct per `seed`.
fn prose(seed: usize, tokens: usize) -> String {
    let words = [
        "routing", "cache", "prefix", "tokens", "the", "pod", "holds", "a", "block", "of",
        "events", "every", "request", "reads", "kvroute", "latency",
    ];
    let mut out = format!("Part {seed}.");
    // Each word and its space is about one token.
    for i in 0..tokens {
        out.push(' ');
        out.push_str(words[(i * 7 + seed * 13 + i / 16) % words.len()]);
    }
    out
}

/// A chat of about `tokens` tokens in messages of ~1,000, distinct per `seed`.
fn chat(seed: usize, tokens: usize) -> Vec<serde_json::Value> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": prose(seed, 500)})];
    let mut i = 0;
    while (i + 1) * 1000 < tokens {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({"role": role, "content": prose(seed * 1000 + i, 1000)}));
        i += 1;
    }
    messages
}

fn tokenize(c: &mut Criterion) {
    let model = qwen3();
    let alone = tokenizers::Tokenizer::from_file(tokenizer_path()).unwrap();
    let hasher = BlockHasher::new(16);
    let mut group = c.benchmark_group("tokenize_cold");
    for tokens in [8_000usize, 32_000] {
        let base = prose(1, tokens);
        group.throughput(Throughput::Bytes(base.len() as u64));
        let mut n = 0usize;
        group.bench_function(BenchmarkId::new("tokenizers-alone", tokens), |b| {
            b.iter(|| {
                n += 1;
                let text = format!("{n} {base}");
                alone.encode(text.as_str(), false).unwrap().len()
            });
        });
        group.bench_function(BenchmarkId::new("kvroute-tokenize-and-hash", tokens), |b| {
            let mut out = Vec::new();
            b.iter(|| {
                n += 1;
                let text = format!("{n} {base}");
                let ids = model
                    .encode_prompt(&Prompt::Text(text), &ChatOptions::default())
                    .unwrap();
                out.clear();
                hasher.hash_tokens(&ids, &ExtraKeys::default(), &mut out);
                out.len()
            });
        });
    }
    group.finish();
}

fn messages(body: Vec<u8>) -> Vec<ProcessingRequest> {
    vec![full_duplex_chat_headers(), request_body(&body, true)]
}

fn body(messages: &[serde_json::Value]) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": messages, "max_tokens": 16})
        .to_string()
        .into_bytes()
}

/// The router `kvroute serve --kv-events-port … --tokenizers-dir …` builds, over 8 endpoints,
/// with `warm` cached (as if reported by its events) on the first.
fn router(model: &Arc<ModelTokenizer>, warm: &[serde_json::Value]) -> Arc<Router> {
    let mut tokenizers = Tokenizers::new();
    tokenizers.insert("m", Arc::clone(model));
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let mut ctx = BuildContext::new(16);
    ctx.tokenizers = tokenizers;
    ctx.precise_index = Some(Arc::clone(&index));
    let scheduler = EndpointPickerConfig::parse(DEFAULT_PRECISE)
        .and_then(|c| c.build(&ctx))
        .unwrap();
    let endpoints = registry(&[8001, 8002, 8003, 8004, 8005, 8006, 8007, 8008]);
    endpoints
        .snapshot()
        .iter()
        .for_each(|e| e.set_events_confirmed(true));
    let parsed: Vec<kvroute_core::ChatMessage> = serde_json::from_value(warm.into()).unwrap();
    let ids = model
        .encode_prompt(&Prompt::Chat(parsed), &ChatOptions::default())
        .unwrap();
    let mut hashes = Vec::new();
    BlockHasher::new(16).hash_tokens(&ids, &ExtraKeys::default(), &mut hashes);
    index
        .write()
        .store(endpoints.snapshot()[0].id(), &hashes, Tier::Gpu);
    let mut prom = prometheus_client::registry::Registry::default();
    Router::new(
        endpoints,
        Arc::new(SchedulerHandle::new(scheduler)),
        ExtProcConfig::default(),
        Metrics::register(&mut prom),
    )
}

fn decide(router: &Arc<Router>, msgs: Vec<ProcessingRequest>) {
    let mut out = Vec::with_capacity(4);
    let mut state = StreamState::new(Arc::clone(router));
    for m in msgs {
        state.on_message(m, &mut out).unwrap();
    }
    assert!(out.len() >= 2);
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("precise_decision");
    group.sample_size(20);
    for tokens in [8_000usize, 32_000, 128_000] {
        let model = Arc::new(qwen3());
        let conversation = chat(tokens, tokens);
        let router = router(&model, &conversation);
        let mut n = 0;
        // Cold: a conversation no one has seen, every message new.
        let mut cold = || {
            n += 1;
            messages(body(&chat(1_000_000 + n, tokens)))
        };
        // Warm: the conversation so far, plus a new question.
        let mut m = 0;
        let mut warm = || {
            m += 1;
            let mut c = conversation.clone();
            c.push(serde_json::json!({"role": "user", "content": prose(m, 50)}));
            messages(body(&c))
        };
        decide(&router, warm());
        group.bench_function(BenchmarkId::new("cold", tokens), |b| {
            b.iter_batched(
                &mut cold,
                |msgs| decide(&router, msgs),
                criterion::BatchSize::LargeInput,
            );
        });
        group.bench_function(BenchmarkId::new("warm", tokens), |b| {
            b.iter_batched(
                &mut warm,
                |msgs| decide(&router, msgs),
                criterion::BatchSize::LargeInput,
            );
        });
        for (name, make) in [
            ("cold", &mut cold as &mut dyn FnMut() -> _),
            ("warm", &mut warm),
        ] {
            let runs = if tokens > 100_000 { 40 } else { 200 };
            let mut times: Vec<f64> = (0..runs)
                .map(|_| {
                    let msgs = make();
                    let t = Instant::now();
                    decide(&router, msgs);
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            eprintln!(
                "precise_decision/{name}/{tokens}: p50 {:.0} us, p99 {:.0} us over {runs}",
                p(0.5),
                p(0.99)
            );
        }
    }
    group.finish();
}

criterion_group!(benches, tokenize, decisions);
criterion_main!(benches);
