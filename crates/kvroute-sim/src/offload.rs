//! The second, slower tier of vLLM's CPU offloading: blocks evicted from the GPU move to a
//! host-memory cache of fixed capacity, least recently used out first. A hit there is
//! copied back (a transfer, cheaper than prefilling again) instead of recomputed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::prompt::PromptTokens;

/// What a cached block's `BlockStored` needs when it moves tier: its place in its chain.
#[derive(Clone, Debug)]
pub(crate) struct BlockInfo {
    /// The engine hash of the block before it; `None` at a chain's root.
    pub(crate) parent: Option<u64>,
    /// The prompt it is a block of (shared, not copied).
    pub(crate) prompt: PromptTokens,
    /// Its index among the prompt's blocks.
    pub(crate) index: usize,
    /// The adapter its chain is rooted at.
    pub(crate) lora: Option<Arc<str>>,
}

/// Host-memory blocks by content hash, in least-recently-used order.
#[derive(Debug, Default)]
pub(crate) struct CpuTier {
    capacity: usize,
    blocks: HashMap<u64, (u64, BlockInfo)>,
    /// Use stamp → hash, oldest first.
    order: BTreeMap<u64, u64>,
    next: u64,
}

impl CpuTier {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Marks `hash` used now (a hit, or a block offloaded again).
    pub(crate) fn touch(&mut self, hash: u64) {
        if let Some((stamp, _)) = self.blocks.get_mut(&hash) {
            self.order.remove(stamp);
            *stamp = self.next;
            self.order.insert(self.next, hash);
            self.next += 1;
        }
    }

    /// Takes in a block evicted from the GPU. Returns false (and keeps nothing) when it is
    /// held already or the tier has no room at all; evicts the least recently used blocks
    /// to make room, into `evicted`.
    pub(crate) fn insert(&mut self, hash: u64, info: BlockInfo, evicted: &mut Vec<u64>) -> bool {
        if self.capacity == 0 || self.contains(hash) {
            self.touch(hash);
            return false;
        }
        while self.blocks.len() >= self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.blocks.remove(&old);
            evicted.push(old);
        }
        self.blocks.insert(hash, (self.next, info));
        self.order.insert(self.next, hash);
        self.next += 1;
        true
    }

    /// Forgets every block (a prefix-cache reset).
    pub(crate) fn clear(&mut self) {
        self.blocks.clear();
        self.order.clear();
    }

    /// Every hash held (for state dumps and tests).
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    fn info() -> BlockInfo {
        BlockInfo {
            parent: None,
            prompt: PromptTokens::Explicit(Arc::from(vec![1u32])),
            index: 0,
            lora: None,
        }
    }

    proptest! {
        /// Against a list in use order: the same blocks held, the same evicted.
        #[test]
        fn evicts_least_recently_used_like_a_list(
            capacity in 0usize..5,
            ops in prop::collection::vec((any::<bool>(), 0u64..8), 1..200),
        ) {
            let mut tier = CpuTier::new(capacity);
            let mut model: VecDeque<u64> = VecDeque::new();
            for (insert, h) in ops {
                if insert {
                    let mut evicted = Vec::new();
                    let kept = tier.insert(h, info(), &mut evicted);
                    let mut want_evicted = Vec::new();
                    let want_kept = capacity > 0 && !model.contains(&h);
                    if let Some(at) = model.iter().position(|&x| x == h) {
                        model.remove(at);
                        model.push_back(h);
                    } else if capacity > 0 {
                        while model.len() >= capacity {
                            want_evicted.push(model.pop_front().unwrap());
                        }
                        model.push_back(h);
                    }
                    prop_assert_eq!(kept, want_kept);
                    prop_assert_eq!(evicted, want_evicted);
                } else {
                    tier.touch(h);
                    if let Some(at) = model.iter().position(|&x| x == h) {
                        model.remove(at);
                        model.push_back(h);
                    }
                }
                prop_assert_eq!(tier.len(), model.len());
                for &h in &model {
                    prop_assert!(tier.contains(h));
                }
            }
            tier.clear();
            prop_assert_eq!(tier.hashes().count(), 0);
        }
    }
}
