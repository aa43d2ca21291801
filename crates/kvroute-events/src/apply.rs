use std::collections::HashMap;

use kvroute_core::{BlockHash, EndpointId};
use kvroute_index::{HashMap64, PrefixIndex, Shared, Tier, WRITE_BATCH_BLOCKS};
use kvroute_tokens::{BlockHasher, ExtraKeys};

use crate::event::{BlockStored, FirstExtra, KvEvent};

/// What applying some events did, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Blocks recorded as held (in some tier).
    pub stored: usize,
    /// Blocks recorded as gone from a tier.
    pub removed: usize,
    /// `AllBlocksCleared` events.
    pub cleared: usize,
    /// Blocks of `BlockStored` events whose parent block is unknown (stored before kvroute
    /// listened, or lost): their hashes cannot be chained, so they are skipped, as are
    /// their descendants.
    pub orphaned: usize,
    /// `BlockRemoved` hashes that name no block kvroute knows of.
    pub unknown_removed: usize,
    /// Events that contradict themselves or the pool (token count not `blocks ×
    /// block_size`, another block size): skipped.
    pub rejected: usize,
}

impl Applied {
    fn add(&mut self, o: Applied) {
        self.stored += o.stored;
        self.removed += o.removed;
        self.cleared += o.cleared;
        self.orphaned += o.orphaned;
        self.unknown_removed += o.unknown_removed;
        self.rejected += o.rejected;
    }
}

/// A block an endpoint holds: kvroute's hash of it, and the tiers it sits in.
#[derive(Clone, Copy, Debug)]
struct Known {
    hash: BlockHash,
    tiers: u8,
}

fn bit(tier: Tier) -> u8 {
    1 << tier as u8
}

/// Applies endpoints' KV events to a [`PrefixIndex`], keyed by kvroute's hashes.
///
/// One applier serves every endpoint of a pool (one block size). Each endpoint's events must
/// come in the order the engine published them; the caller (the subscriber) checks
/// sequence numbers and calls [`Applier::clear`] when it cannot account for a gap.
#[derive(Debug)]
pub struct Applier {
    hasher: BlockHasher,
    endpoints: HashMap<EndpointId, HashMap64<Known>>,
    scratch: Vec<u8>,
    /// The stored blocks' kvroute hashes, reused from event to event.
    hashes: Vec<BlockHash>,
}

impl Applier {
    /// An applier for engines caching blocks of `block_size` tokens (the pool's, as its
    /// `cache_config_info` says; requests must be hashed with the same size).
    pub fn new(block_size: usize) -> Self {
        Self {
            hasher: BlockHasher::new(block_size),
            endpoints: HashMap::new(),
            scratch: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// Blocks `endpoint` is known to hold (in any tier).
    pub fn known_blocks(&self, endpoint: &EndpointId) -> usize {
        self.endpoints.get(endpoint).map_or(0, HashMap64::len)
    }

    /// Applies `events` of `endpoint`, in order, taking the index's write lock for at most
    /// [`WRITE_BATCH_BLOCKS`] blocks at a time.
    pub fn apply(
        &mut self,
        index: &Shared<PrefixIndex>,
        endpoint: &EndpointId,
        events: &[KvEvent],
    ) -> Applied {
        let mut done = Applied::default();
        for event in events {
            let one = match event {
                KvEvent::BlockStored(stored) => self.store(index, endpoint, stored),
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                } => self.remove(index, endpoint, block_hashes, medium.tier()),
                KvEvent::AllBlocksCleared => {
                    self.clear(index, endpoint);
                    Applied {
                        cleared: 1,
                        ..Applied::default()
                    }
                }
            };
            done.add(one);
        }
        done
    }

    /// Forgets everything `endpoint` holds: the engine restarted, or a gap in its events
    /// could not be filled, so what is known of it can no longer be trusted. Returns the
    /// blocks forgotten.
    pub fn clear(&mut self, index: &Shared<PrefixIndex>, endpoint: &EndpointId) -> usize {
        let n = self.endpoints.remove(endpoint).map_or(0, |m| m.len());
        index.write().clear(endpoint);
        n
    }

    /// Forgets `endpoint` altogether: it left the pool.
    pub fn remove_endpoint(&mut self, index: &Shared<PrefixIndex>, endpoint: &EndpointId) {
        self.endpoints.remove(endpoint);
        index.write().remove_endpoint(endpoint);
    }

    fn store(
        &mut self,
        index: &Shared<PrefixIndex>,
        endpoint: &EndpointId,
        event: &BlockStored,
    ) -> Applied {
        let blocks = event.block_hashes.len();
        let bs = self.hasher.block_size();
        if event.block_size != bs || event.token_ids.len() != blocks * bs {
            return Applied {
                rejected: 1,
                ..Applied::default()
            };
        }
        let known = self.endpoints.entry(endpoint.clone()).or_default();
        let mut parent = match event.parent_block_hash {
            None => match &event.first_extra {
                FirstExtra::None => BlockHasher::root(&ExtraKeys {
                    lora: event.lora_name.as_deref(),
                    cache_salt: None,
                }),
                FirstExtra::Salt(salt) => BlockHasher::root(&ExtraKeys {
                    lora: event.lora_name.as_deref(),
                    cache_salt: Some(salt),
                }),
                // Keys no request hash reproduces: a root no request reaches, so the blocks
                // are known (for their removal) but never matched.
                FirstExtra::Unknown => BlockHasher::root(&ExtraKeys {
                    lora: Some("\u{0}kvroute/unmatchable"),
                    cache_salt: event.lora_name.as_deref(),
                }),
            },
            Some(engine) => match known.get(&engine) {
                Some(k) => k.hash,
                None => {
                    return Applied {
                        orphaned: blocks,
                        ..Applied::default()
                    };
                }
            },
        };
        let tier = event.medium.tier();
        self.hashes.clear();
        for (&engine, tokens) in event
            .block_hashes
            .iter()
            .zip(event.token_ids.chunks_exact(bs))
        {
            parent = BlockHasher::chain(parent, tokens, &mut self.scratch);
            self.hashes.push(parent);
            let entry = known.entry(engine).or_insert(Known {
                hash: parent,
                tiers: 0,
            });
            if entry.hash != parent {
                // The engine reused a hash for other content (its cache was reset without
                // an event, or its hashes collide): the old content is gone.
                let old = entry.hash;
                *entry = Known {
                    hash: parent,
                    tiers: 0,
                };
                index.write().remove(endpoint, &[old], None);
            }
            entry.tiers |= bit(tier);
        }
        for chunk in self.hashes.chunks(WRITE_BATCH_BLOCKS) {
            index.write().store(endpoint, chunk, tier);
        }
        Applied {
            stored: blocks,
            ..Applied::default()
        }
    }

    fn remove(
        &mut self,
        index: &Shared<PrefixIndex>,
        endpoint: &EndpointId,
        engine_hashes: &[u64],
        tier: Tier,
    ) -> Applied {
        let mut done = Applied::default();
        let Some(known) = self.endpoints.get_mut(endpoint) else {
            done.unknown_removed = engine_hashes.len();
            return done;
        };
        let mut ours = Vec::with_capacity(engine_hashes.len());
        for engine in engine_hashes {
            match known.get_mut(engine) {
                Some(k) if k.tiers & bit(tier) != 0 => {
                    ours.push(k.hash);
                    k.tiers &= !bit(tier);
                    if k.tiers == 0 {
                        known.remove(engine);
                    }
                }
                _ => done.unknown_removed += 1,
            }
        }
        done.removed = ours.len();
        for chunk in ours.chunks(WRITE_BATCH_BLOCKS) {
            index.write().remove(endpoint, chunk, Some(tier));
        }
        done
    }
}

#[cfg(test)]
mod tests;
