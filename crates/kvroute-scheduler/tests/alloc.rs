//! A warm scheduling cycle allocates nothing (the crate's promise, `src/lib.rs`): after
//! warming, `Scheduler::schedule` under kvroute's default profiles over 64 endpoints makes no
//! allocation on the calling thread, for prompts sent as token ids (precise profile, over a
//! precise index every endpoint holds blocks in) and as text (approximate profile).
//!
//! Allocations are counted by `allocation-counter`'s global allocator, per thread: a counting
//! `GlobalAlloc` of our own needs `unsafe impl`, which the workspace's `unsafe_code = "forbid"`
//! rules out (an `allow` cannot lift a `forbid`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    missing_docs
)]

use std::hint::black_box;
use std::sync::Arc;

use kvroute_core::{InferenceRequest, Prompt, RequestHints};
use kvroute_endpoints::{EndpointState, InFlightGuard, Registry};
use kvroute_index::{PrefixIndex, Shared, Tier};
use kvroute_scheduler::config::{DEFAULT_APPROX, DEFAULT_PRECISE};
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, Scheduler, SchedulingRequest};
use kvroute_tokens::{BlockHasher, ExtraKeys};
use test_support::completion as request;
use test_support::{endpoints, splitmix64, token_ids};

const ENDPOINTS: usize = 64;
const BLOCK_SIZE: usize = 16;
/// Distinct requests of the same shape, cycled over.
const REQUESTS: u64 = 16;
const WARM: usize = 200;
const MEASURED: usize = 1_000;

/// ~2,000 tokens: a shared system prompt, then the part of conversation `seed`.
fn tokens(seed: u64) -> Vec<u32> {
    token_ids(u64::MAX, 1_000)
        .chain(token_ids(seed, 1_000))
        .collect()
}

/// ~8 KB of text: a shared system prompt, then the part of conversation `seed`.
fn text(seed: u64) -> String {
    let words = [
        "routing", "cache", "prefix", "tokens", "the", "pod", "holds", "a",
    ];
    let mut out = String::new();
    for (part, bytes) in [(u64::MAX, 4_096), (seed, 8_192)] {
        let mut i = 0;
        while out.len() < bytes {
            out.push(' ');
            out.push_str(words[(splitmix64(part ^ i) % words.len() as u64) as usize]);
            i += 1;
        }
    }
    out
}

fn registry() -> Arc<Registry> {
    endpoints(ENDPOINTS as u16)
}

/// Endpoint `e` holds conversations `s ≡ e (mod 64)` among the first 256 (in GPU memory,
/// every fourth also in CPU memory on endpoint `e + 1`), so every endpoint holds the system
/// prompt; every stream confirmed.
fn precise_index(eps: &[Arc<EndpointState>]) -> Arc<Shared<PrefixIndex>> {
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let hasher = BlockHasher::new(BLOCK_SIZE);
    for s in 0..4 * ENDPOINTS as u64 {
        let mut hashes = Vec::new();
        hasher.hash_tokens(&tokens(s), &ExtraKeys::default(), &mut hashes);
        let e = s as usize % ENDPOINTS;
        index.write().store(eps[e].id(), &hashes, Tier::Gpu);
        if s % 4 == 0 {
            index
                .write()
                .store(eps[(e + 1) % ENDPOINTS].id(), &hashes, Tier::Cpu);
        }
    }
    for e in eps {
        e.set_events_confirmed(true);
    }
    index
}

/// 0 to 4 requests in flight per endpoint, with prefill queued.
fn load(eps: &[Arc<EndpointState>]) -> Vec<InFlightGuard> {
    eps.iter()
        .enumerate()
        .flat_map(|(i, e)| (0..(i * 7) % 5).map(move |_| e.acquire_with_prefill(256)))
        .collect()
}

/// Warms `scheduler` with `WARM` decisions over `requests`, then counts the allocations this
/// thread makes in each of `MEASURED` more; fails naming the calls that allocated.
fn assert_warm_cycles_do_not_allocate(
    what: &str,
    scheduler: &Scheduler,
    eps: &[Arc<EndpointState>],
    requests: &[InferenceRequest],
) {
    assert_cycles_after_warming_do_not_allocate(what, scheduler, eps, requests, WARM);
}

fn assert_cycles_after_warming_do_not_allocate(
    what: &str,
    scheduler: &Scheduler,
    eps: &[Arc<EndpointState>],
    requests: &[InferenceRequest],
    warm: usize,
) {
    // The counter is in place: this test would see an allocation.
    let probe = allocation_counter::measure(|| {
        black_box(Vec::<u8>::with_capacity(black_box(8)));
    });
    assert_eq!(probe.count_total, 1, "allocation-counter is not counting");

    let hints = RequestHints::default();
    // Built before anything is measured.
    let requests: Vec<SchedulingRequest<'_>> = requests
        .iter()
        .map(|r| SchedulingRequest::new(Some(r), &hints))
        .collect();
    for r in requests.iter().cycle().take(warm) {
        black_box(scheduler.schedule(r, eps).unwrap());
    }
    let mut counts = Vec::with_capacity(MEASURED);
    let mut bytes = 0;
    let total = allocation_counter::measure(|| {
        for r in requests.iter().cycle().skip(warm).take(MEASURED) {
            let one = allocation_counter::measure(|| {
                black_box(scheduler.schedule(r, eps).unwrap());
            });
            // Within capacity: pushing does not allocate.
            counts.push(one.count_total);
            bytes += one.bytes_total;
        }
    });
    let allocating: Vec<(usize, u64)> = counts
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .collect();
    assert!(
        total.count_total == 0,
        "{what}: {} allocations ({bytes} bytes) in {MEASURED} warm decisions; \
         (decision, allocations): {:?}",
        total.count_total,
        &allocating[..allocating.len().min(20)],
    );
}

#[test]
fn a_warm_precise_decision_for_token_ids_allocates_nothing() {
    let reg = registry();
    let eps = reg.snapshot();
    let mut ctx = BuildContext::new(BLOCK_SIZE);
    ctx.precise_index = Some(precise_index(&eps));
    let scheduler = EndpointPickerConfig::parse(DEFAULT_PRECISE)
        .unwrap()
        .build(&ctx)
        .unwrap();
    let _load = load(&eps);
    // Even seeds continue conversations the index holds; odd ones are new to it.
    let requests: Vec<InferenceRequest> = (0..REQUESTS)
        .map(|i| {
            let seed = if i % 2 == 0 { i * 5 } else { 1_000 + i };
            request(Prompt::Tokens(tokens(seed)))
        })
        .collect();
    assert_warm_cycles_do_not_allocate("precise, token ids", &scheduler, &eps, &requests);
}

#[test]
fn a_warm_approximate_decision_for_text_allocates_nothing() {
    let reg = registry();
    let eps = reg.snapshot();
    let scheduler = EndpointPickerConfig::parse(DEFAULT_APPROX)
        .unwrap()
        .build(&BuildContext::new(BLOCK_SIZE))
        .unwrap();
    let _load = load(&eps);
    let requests: Vec<InferenceRequest> = (0..REQUESTS)
        .map(|i| request(Prompt::Text(text(i))))
        .collect();
    assert_warm_cycles_do_not_allocate("approximate, text", &scheduler, &eps, &requests);
}

/// New prompts all the time, into approximate LRUs that are full: every decision records a
/// prompt never seen and evicts as much, and still allocates nothing once the index has
/// reached its size.
#[test]
fn new_prompts_into_a_full_approximate_index_allocate_nothing() {
    let reg = registry();
    let eps = reg.snapshot();
    let config = DEFAULT_APPROX.replace("lruCapacityPerServer: 31250", "lruCapacityPerServer: 512");
    assert_ne!(config, DEFAULT_APPROX);
    let scheduler = EndpointPickerConfig::parse(&config)
        .unwrap()
        .build(&BuildContext::new(BLOCK_SIZE))
        .unwrap();
    let _load = load(&eps);
    let warm = 3_000;
    let requests: Vec<InferenceRequest> = (0..(warm + MEASURED) as u64)
        .map(|i| request(Prompt::Text(text(i))))
        .collect();
    assert_cycles_after_warming_do_not_allocate(
        "approximate, new prompts, full LRUs",
        &scheduler,
        &eps,
        &requests,
        warm,
    );
}
