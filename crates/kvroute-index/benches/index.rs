//! Match, store and remove on populated indexes (see `common` for their shape).

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvroute_index::{PrefixIndex, Tier};

mod common;
use common::*;

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("match");
    group.sample_size(30);
    for (blocks, blocks_name) in [(1_000_000, "1M"), (10_000_000, "10M")] {
        for endpoints in [64, 1000] {
            let mut idx = PrefixIndex::new();
            populate(&mut idx, blocks, endpoints);
            // Many different prompts in turn, so each match reads index memory that is
            // mostly not in cache, as on a busy router.
            let n = conversations(blocks);
            let short: Vec<_> = (0..n).step_by((n / 1024).max(1)).map(chain).collect();
            let long: Vec<_> = (0..LONG_CHAINS).map(long_chain).collect();
            for (queries, name) in [(&short, "512"), (&long, "8192")] {
                for q in queries.iter() {
                    let m = idx.match_prefix(q);
                    assert!(
                        m.iter().any(|m| m.blocks as usize == q.len()),
                        "full match expected"
                    );
                }
                group.throughput(Throughput::Elements(queries[0].len() as u64));
                group.bench_with_input(
                    BenchmarkId::new(
                        format!("{name}-blocks"),
                        format!("{blocks_name}-blocks/{endpoints}-endpoints"),
                    ),
                    queries,
                    |b, qs| {
                        let mut i = 0;
                        b.iter(|| {
                            i = (i + 1) % qs.len();
                            idx.match_prefix(&qs[i])
                        });
                    },
                );
            }
        }
    }
    group.finish();
}

fn writing(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    group.sample_size(10);
    let chains: Vec<_> = (0..200).map(chain).collect();
    let blocks: usize = chains.iter().map(Vec::len).sum();
    group.throughput(Throughput::Elements(blocks as u64));
    group.bench_function("store-100k-blocks", |b| {
        b.iter_batched(
            PrefixIndex::new,
            |mut idx| {
                for (i, ch) in chains.iter().enumerate() {
                    idx.store(&endpoint(i % 64), ch, Tier::Gpu);
                }
                idx
            },
            BatchSize::LargeInput,
        );
    });
    group.bench_function("remove-100k-blocks", |b| {
        b.iter_batched(
            || {
                let mut idx = PrefixIndex::new();
                for (i, ch) in chains.iter().enumerate() {
                    idx.store(&endpoint(i % 64), ch, Tier::Gpu);
                }
                idx
            },
            |mut idx| {
                for (i, ch) in chains.iter().enumerate() {
                    idx.remove(&endpoint(i % 64), ch, None);
                }
                idx
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, matching, writing);
criterion_main!(benches);
