//! The scheduler's decision time, without tokenization, for kvroute's default profiles at
//! 8, 64 and 1,000 endpoints:
//!
//! - `approx-tokens`, `approx-text`: `config::DEFAULT_APPROX` (no KV events) for prompts of
//!   ~2,000 token ids and of ~8 KB of text;
//! - `precise-tokens`: `config::DEFAULT_PRECISE` (KV events) for prompts of ~2,000 token ids,
//!   block size 16, over a precise index in which every endpoint holds the shared system
//!   prompt and 16 conversations of its own (every fourth one also offloaded, in the CPU
//!   tier, on its neighbour), every endpoint's event stream confirmed;
//! - `least-in-flight`: `Scheduler::least_in_flight(0)`, the floor.
//!
//! Prompts share a ~1,000-token (~4 KB) system prompt and differ after it. Before measuring,
//! each scheduler makes 4,000 decisions for prompts never seen again, holding a window of
//! requests in flight, so the approximate index has learnt where the system prompt went.
//! Measured decisions cycle over 256 prepared requests, half of them continuing a
//! conversation the precise index holds, half new; endpoints carry a fixed, uneven load.
//! A decision is `Scheduler::schedule` alone: no body parse, no tokenizer, no ext_proc.
//!
//! criterion's figures, then the mean, p50 and p99 of 20,000 decisions timed one by one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    missing_docs
)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kvroute_core::{InferenceRequest, Prompt, RequestHints};
use kvroute_endpoints::{EndpointState, InFlightGuard, Registry};
use kvroute_index::{PrefixIndex, Shared, Tier};
use kvroute_scheduler::config::{DEFAULT_APPROX, DEFAULT_PRECISE};
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, Scheduler, SchedulingRequest};
use kvroute_tokens::{BlockHasher, ExtraKeys};
use test_support::completion as request;
use test_support::{endpoints, splitmix64, token_ids};

const SIZES: [usize; 3] = [8, 64, 1_000];
const BLOCK_SIZE: usize = 16;
/// Tokens of the system prompt every request starts with, and of each request's own part.
const SYSTEM_TOKENS: usize = 1_000;
const SUFFIX_TOKENS: usize = 1_000;
/// Bytes of text of the same two parts (~4 bytes per token).
const SYSTEM_BYTES: usize = 4_096;
const SUFFIX_BYTES: usize = 4_096;
/// Conversations each endpoint holds in the precise index.
const CONVERSATIONS_PER_ENDPOINT: u64 = 16;
/// Decisions made before measuring, for prompts not measured.
const WARM_DECISIONS: u64 = 4_000;
const WARM_SEED: u64 = 1 << 40;
/// Requests the measured decisions cycle over.
const RING: usize = 256;
const NEW_SEED: u64 = 1 << 32;
/// Decisions timed one by one for the percentiles.
const TIMED: usize = 20_000;

/// The shared system prompt, then the part of conversation `seed`.
fn prompt_tokens(seed: u64) -> Vec<u32> {
    token_ids(u64::MAX, SYSTEM_TOKENS)
        .chain(token_ids(seed, SUFFIX_TOKENS))
        .collect()
}

/// About `bytes` bytes of prose, distinct per `seed`.
fn prose(seed: u64, bytes: usize) -> String {
    const WORDS: [&str; 16] = [
        "routing", "cache", "prefix", "tokens", "the", "pod", "holds", "a", "block", "of",
        "events", "every", "request", "reads", "kvroute", "latency",
    ];
    let mut out = format!("Part {seed}.");
    let mut i = 0u64;
    while out.len() < bytes {
        out.push(' ');
        out.push_str(WORDS[(splitmix64(seed ^ i) % WORDS.len() as u64) as usize]);
        i += 1;
    }
    out
}

fn prompt_text(seed: u64) -> String {
    let mut text = prose(u64::MAX, SYSTEM_BYTES);
    text.push_str("\n\n");
    text.push_str(&prose(seed, SUFFIX_BYTES));
    text
}

/// What the pods' KV events would have told: endpoint `e` holds (in GPU memory) the
/// conversations `s ≡ e (mod n)` among the first `16·n`, system prompt included; every fourth
/// is also offloaded to CPU memory on endpoint `e + 1`.
fn fill_precise(index: &Shared<PrefixIndex>, eps: &[Arc<EndpointState>]) {
    let n = eps.len();
    let hasher = BlockHasher::new(BLOCK_SIZE);
    let mut hashes = Vec::new();
    for s in 0..n as u64 * CONVERSATIONS_PER_ENDPOINT {
        hashes.clear();
        hasher.hash_tokens(&prompt_tokens(s), &ExtraKeys::default(), &mut hashes);
        let e = s as usize % n;
        for chunk in hashes.chunks(64) {
            index.write().store(eps[e].id(), chunk, Tier::Gpu);
        }
        if s % 4 == 0 {
            index
                .write()
                .store(eps[(e + 1) % n].id(), &hashes, Tier::Cpu);
        }
    }
    for e in eps {
        e.set_events_confirmed(true);
    }
}

/// The measured requests: even ones continue a conversation the precise index holds, odd
/// ones are new.
fn ring(n: usize, make: fn(u64) -> Prompt) -> Vec<InferenceRequest> {
    let held = n as u64 * CONVERSATIONS_PER_ENDPOINT;
    (0..RING as u64)
        .map(|i| {
            let seed = if i % 2 == 0 {
                (i / 2 * 37) % held
            } else {
                NEW_SEED + i
            };
            request(make(seed))
        })
        .collect()
}

/// `WARM_DECISIONS` decisions for new conversations, each primary then holding the request
/// until two per endpoint are in flight, so that load spreads the system prompt.
fn warm(s: &Scheduler, eps: &[Arc<EndpointState>], make: fn(u64) -> Prompt) {
    let hints = RequestHints::default();
    let mut window = VecDeque::new();
    for k in 0..WARM_DECISIONS {
        let req = request(make(WARM_SEED + k));
        let d = s
            .schedule(&SchedulingRequest::new(Some(&req), &hints), eps)
            .unwrap();
        window.push_back(d.primary().acquire_with_prefill(d.prefill_tokens()));
        if window.len() > 2 * eps.len() {
            window.pop_front();
        }
    }
}

/// A fixed uneven load for the measured decisions: 0 to 4 requests in flight per endpoint,
/// each with 256 prompt tokens of prefill queued.
fn load(eps: &[Arc<EndpointState>]) -> Vec<InFlightGuard> {
    eps.iter()
        .enumerate()
        .flat_map(|(i, e)| (0..(i * 7) % 5).map(move |_| e.acquire_with_prefill(256)))
        .collect()
}

struct Case {
    name: &'static str,
    scheduler: Scheduler,
    registry: Arc<Registry>,
    requests: Vec<InferenceRequest>,
    /// Endpoints holding anything in the approximate index after warming.
    approx_holders: Option<usize>,
    _ctx: BuildContext,
}

fn tokens(seed: u64) -> Prompt {
    Prompt::Tokens(prompt_tokens(seed))
}

fn text(seed: u64) -> Prompt {
    Prompt::Text(prompt_text(seed))
}

fn build(name: &'static str, n: usize) -> Case {
    let registry = endpoints(n as u16);
    let eps = registry.snapshot();
    let mut ctx = BuildContext::new(BLOCK_SIZE);
    let (yaml, make): (Option<&str>, fn(u64) -> Prompt) = match name {
        "approx-tokens" => (Some(DEFAULT_APPROX), tokens),
        "approx-text" => (Some(DEFAULT_APPROX), text),
        "precise-tokens" => (Some(DEFAULT_PRECISE), tokens),
        "least-in-flight" => (None, tokens),
        _ => unreachable!("{name}"),
    };
    if name.starts_with("precise") {
        let index = Arc::new(Shared::new(PrefixIndex::new()));
        fill_precise(&index, &eps);
        ctx.precise_index = Some(index);
    }
    let scheduler = match yaml {
        Some(yaml) => EndpointPickerConfig::parse(yaml)
            .unwrap()
            .build(&ctx)
            .unwrap(),
        None => Scheduler::least_in_flight(0),
    };
    warm(&scheduler, &eps, make);
    let approx_holders = ctx.approx_indexes().first().map(|index| {
        let index = index.read();
        eps.iter()
            .filter(|e| index.index().endpoint_blocks(e.id()) > 0)
            .count()
    });
    Case {
        name,
        scheduler,
        registry,
        requests: ring(n, make),
        approx_holders,
        _ctx: ctx,
    }
}

struct Figures {
    case: String,
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn schedule(c: &mut Criterion) {
    let hints = RequestHints::default();
    let mut figures = Vec::new();
    let mut group = c.benchmark_group("schedule");
    for n in SIZES {
        for name in [
            "least-in-flight",
            "approx-tokens",
            "approx-text",
            "precise-tokens",
        ] {
            let case = build(name, n);
            let eps = case.registry.snapshot();
            let _load = load(&eps);
            if let Some(holders) = case.approx_holders {
                eprintln!("{name}/{n}: after warming, {holders} endpoints hold approximate blocks");
            }
            let requests: Vec<SchedulingRequest<'_>> = case
                .requests
                .iter()
                .map(|r| SchedulingRequest::new(Some(r), &hints))
                .collect();
            let mut i = 0usize;
            group.bench_function(BenchmarkId::new(case.name, n), |b| {
                b.iter(|| {
                    let r = &requests[i % RING];
                    i += 1;
                    black_box(case.scheduler.schedule(black_box(r), &eps).unwrap())
                });
            });
            let mut times: Vec<Duration> = (0..TIMED)
                .map(|k| {
                    let r = &requests[k % RING];
                    let start = Instant::now();
                    black_box(case.scheduler.schedule(r, &eps).unwrap());
                    start.elapsed()
                })
                .collect();
            times.sort_unstable();
            figures.push(Figures {
                case: format!("{name}/{n}"),
                mean: times.iter().sum::<Duration>() / TIMED as u32,
                p50: times[TIMED / 2],
                p99: times[TIMED * 99 / 100],
            });
        }
    }
    group.finish();
    eprintln!("\nper decision, {TIMED} decisions timed one by one:");
    eprintln!("{:<24} {:>10} {:>10} {:>10}", "case", "mean", "p50", "p99");
    for f in &figures {
        eprintln!(
            "{:<24} {:>10.2?} {:>10.2?} {:>10.2?}",
            f.case, f.mean, f.p50, f.p99
        );
    }
}

criterion_group!(benches, schedule);
criterion_main!(benches);
