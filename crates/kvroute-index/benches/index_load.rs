//! Figures criterion does not give: memory per (block, endpoint) entry, counted by a
//! counting allocator, and match latency percentiles while another thread applies block
//! events at 1M blocks/s through the shared lock. Prints a table; run with
//! `cargo bench -p kvroute-index --bench index_load`.

#![allow(clippy::print_stdout)]

use std::alloc::System;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvroute_core::BlockHash;
use kvroute_index::{PrefixIndex, Shared, Tier};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

mod common;
use common::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

fn memory(blocks: usize, endpoints: usize) {
    let before = live_bytes();
    let mut idx = PrefixIndex::new();
    let started = Instant::now();
    populate(&mut idx, blocks, endpoints);
    let took = started.elapsed();
    let bytes = live_bytes() - before;
    println!(
        "memory  {:>5} blocks {:>4} endpoints: {:>9} distinct blocks, {:>9} entries, {:>7.1} MiB, {:>5.1} B/entry, {:>5.1} B/block  (built in {:.2?}, {:.1}M entries/s)",
        if blocks >= 10_000_000 { "10M" } else { "1M" },
        endpoints,
        idx.blocks(),
        idx.entries(),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / idx.entries() as f64,
        bytes as f64 / idx.blocks() as f64,
        took,
        idx.entries() as f64 / took.as_secs_f64() / 1e6,
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Open loop: match `n` queries at a fixed rate, one every `every`, and time each from when
/// it was due, so a reader held up by the writer is charged for every query that queued
/// behind it (a closed loop would hide that: coordinated omission).
fn latencies(
    shared: &Shared<PrefixIndex>,
    queries: &[Vec<BlockHash>],
    n: usize,
    every: Duration,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let due = start + every * i as u32;
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let m = shared.read().match_prefix(&queries[i % queries.len()]);
        out.push(due.elapsed());
        assert!(!m.is_empty());
    }
    out.sort_unstable();
    out
}

/// Applies `rate` block events per second in batches of `batch` (stores of fresh blocks on
/// churn endpoints, then their removal), until `stop`.
fn writer(
    shared: Arc<Shared<PrefixIndex>>,
    rate: f64,
    batch: usize,
    stop: Arc<AtomicBool>,
    applied: Arc<AtomicU64>,
) {
    let started = Instant::now();
    let mut next: u64 = 1 << 56;
    let mut stored: std::collections::VecDeque<(usize, Vec<BlockHash>)> = Default::default();
    let mut done: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if done + batch as u64 > due {
            // Ahead of schedule: sleep rather than spin, so the writer takes one core only
            // while it writes and the reader's core is left alone.
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        let mut idx = shared.write();
        if stored.len() > 64 {
            if let Some((e, blocks)) = stored.pop_front() {
                idx.remove(&endpoint(e), &blocks, None);
                done += blocks.len() as u64;
            }
        } else {
            let blocks: Vec<BlockHash> = (0..batch as u64)
                .map(|i| BlockHash(mix(next + i)))
                .collect();
            next += batch as u64;
            let e = 2000 + (next as usize % 8);
            idx.store(&endpoint(e), &blocks, Tier::Gpu);
            stored.push_back((e, blocks));
            done += batch as u64;
        }
        drop(idx);
        applied.store(done, Ordering::Relaxed);
    }
}

fn contention(batch: usize) {
    let mut idx = PrefixIndex::new();
    populate(&mut idx, 1_000_000, 64);
    let shared = Arc::new(Shared::new(idx));
    let queries: Vec<Vec<BlockHash>> = (0..conversations(1_000_000))
        .step_by(7)
        .map(chain)
        .collect();
    let every = Duration::from_micros(50);
    latencies(&shared, &queries, 2_000, every);
    let idle = latencies(&shared, &queries, 40_000, every);

    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let w = {
        let (shared, stop, applied) =
            (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&applied));
        std::thread::spawn(move || writer(shared, 1e6, batch, stop, applied))
    };
    std::thread::sleep(Duration::from_millis(200));
    let from = applied.load(Ordering::Relaxed);
    let t = Instant::now();
    let busy = latencies(&shared, &queries, 40_000, every);
    let rate = (applied.load(Ordering::Relaxed) - from) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    w.join().ok();
    println!(
        "match 512 blocks (20k/s, open loop), 1M-block index, writer batches of {batch:>4}: idle p50 {:>8.2?} p99 {:>8.2?} | under {:.2}M events/s: p50 {:>8.2?} p99 {:>8.2?} | p99 ratio {:.2}",
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        rate / 1e6,
        percentile(&busy, 0.5),
        percentile(&busy, 0.99),
        percentile(&busy, 0.99).as_secs_f64() / percentile(&idle, 0.99).as_secs_f64(),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    memory(1_000_000, 64);
    memory(1_000_000, 1000);
    memory(10_000_000, 64);
    memory(10_000_000, 1000);
    for batch in [8, 16, 64, 256] {
        for _ in 0..3 {
            contention(batch);
        }
    }
}
