//! A populated index shaped like a serving cluster's: conversations of 512 blocks that open
//! with one of 64 shared system prompts (32 blocks each), spread over the endpoints, plus a
//! few 8,192-block (128k-token) documents.

#![allow(dead_code, unreachable_pub)]

use kvroute_core::{BlockHash, EndpointId};
use kvroute_index::{PrefixIndex, Tier};

pub const CHAIN: usize = 512;
pub const SYSTEM: usize = 32;
pub const LONG: usize = 8192;
pub const LONG_CHAINS: usize = 8;

/// splitmix64: stands in for block hashes, which the index treats as opaque.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn endpoint(i: usize) -> EndpointId {
    EndpointId::new(format!("pod-{i:04}"))
}

/// Conversation `c`'s blocks: its group's system prompt, then its own blocks.
pub fn chain(c: usize) -> Vec<BlockHash> {
    let group = (c % 64) as u64;
    (0..CHAIN as u64)
        .map(|i| {
            if (i as usize) < SYSTEM {
                BlockHash(mix(group << 32 | i))
            } else {
                BlockHash(mix((c as u64 + 1_000) << 32 | i))
            }
        })
        .collect()
}

pub fn long_chain(d: usize) -> Vec<BlockHash> {
    (0..LONG as u64)
        .map(|i| BlockHash(mix((d as u64 + 1) << 48 | i)))
        .collect()
}

/// Conversations needed for about `blocks` distinct blocks.
pub fn conversations(blocks: usize) -> usize {
    blocks.saturating_sub(LONG * LONG_CHAINS) / (CHAIN - SYSTEM)
}

/// Fills `idx` with about `blocks` distinct blocks over `endpoints` endpoints.
pub fn populate(idx: &mut PrefixIndex, blocks: usize, endpoints: usize) {
    for c in 0..conversations(blocks) {
        idx.store(&endpoint(c % endpoints), &chain(c), Tier::Gpu);
    }
    for d in 0..LONG_CHAINS {
        idx.store(&endpoint(d % endpoints), &long_chain(d), Tier::Gpu);
    }
}
