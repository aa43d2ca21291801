//! KV events decoded and applied per second, on one core: vLLM-shaped batches (map-encoded
//! events, 16-token blocks, 16 blocks per `BlockStored`, as the simulator's encoder writes
//! them) through `decode_batch` alone, and through a `Follower` into the index (each chain
//! stored, then removed, so the index stays the same size).

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvroute_core::EndpointId;
use kvroute_events::{DEFAULT_MAX_BATCH_ENTRIES, Follower, decode_batch};
use kvroute_index::{PrefixIndex, Shared};
use kvroute_sim::wire::{EventEncoding, encode_batch};
use kvroute_sim::{KvEvent, Medium};

const BLOCK: usize = 16;
const BLOCKS: usize = 16;
const CHAINS: usize = 256;

/// Per chain: a batch storing it, and one removing it.
fn batches() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..CHAINS)
        .map(|c| {
            let hashes: Vec<u64> = (0..BLOCKS as u64)
                .map(|b| (c as u64) << 32 | b | 1 << 63)
                .collect();
            let tokens: Vec<u32> = (0..(BLOCK * BLOCKS) as u32)
                .map(|t| (c as u32 * 7919 + t * 31) % 128_256)
                .collect();
            let stored = KvEvent::BlockStored {
                block_hashes: hashes.clone(),
                parent_block_hash: None,
                token_ids: tokens,
                block_size: BLOCK,
                lora_name: None,
                medium: Medium::Gpu,
            };
            let removed = KvEvent::BlockRemoved {
                block_hashes: hashes,
                medium: Medium::Gpu,
            };
            (
                encode_batch(1.7e9, &[stored], 0, EventEncoding::Map),
                encode_batch(1.7e9, &[removed], 0, EventEncoding::Map),
            )
        })
        .collect()
}

fn events(c: &mut Criterion) {
    let batches = batches();
    let mut g = c.benchmark_group("kv_events");
    g.throughput(Throughput::Elements((CHAINS * BLOCKS * 2) as u64));
    g.bench_function("decode", |b| {
        b.iter(|| {
            for (stored, removed) in &batches {
                std::hint::black_box(decode_batch(stored, DEFAULT_MAX_BATCH_ENTRIES).unwrap());
                std::hint::black_box(decode_batch(removed, DEFAULT_MAX_BATCH_ENTRIES).unwrap());
            }
        });
    });
    let index = Shared::new(PrefixIndex::new());
    let mut follower = Follower::new(EndpointId::new("pod"), BLOCK);
    let mut seq = 0u64;
    g.bench_function("decode_and_apply", |b| {
        b.iter(|| {
            for (stored, removed) in &batches {
                follower.apply(&index, seq, stored).unwrap();
                follower.apply(&index, seq + 1, removed).unwrap();
                seq += 2;
            }
        });
    });
    g.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
