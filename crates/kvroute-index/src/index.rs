use std::collections::HashMap;

use kvroute_core::{BlockHash, EndpointId};

use crate::hasher::Set;
use crate::holders::{self, Holders};
use crate::table::NodeTable;

/// Where an endpoint keeps a block; a block may sit in several tiers of one endpoint at once
/// (vLLM's CPU offloading stores a copy of a GPU block).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Tier {
    /// In accelerator memory: a hit costs nothing.
    Gpu = 0,
    /// In host memory: a hit costs a copy back.
    Cpu = 1,
    /// On disk or a remote store: a hit costs a load.
    Disk = 2,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn best(mask: u8) -> usize {
        mask.trailing_zeros() as usize
    }
}

/// How much of a request's prefix one endpoint holds.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EndpointMatch {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// Consecutive blocks from the start of the request that it holds, in any tier.
    pub blocks: u32,
    /// Of those blocks, how many are at best in each tier (`[gpu, cpu, disk]`).
    pub per_tier: [u32; 3],
}

/// The blocks one endpoint holds; the reverse map that makes clearing or dropping an
/// endpoint cost O(its blocks). Without endpoint sets only their count is kept.
#[derive(Debug)]
struct EndpointBlocks {
    id: EndpointId,
    blocks: Set,
    held: usize,
}

/// Which endpoints hold which blocks, in which tiers.
///
/// A store is one map entry per block (hash → holders) plus one per (block, endpoint) in the
/// endpoint's reverse set. Matching looks up the request's hashes in order and keeps the set
/// of endpoints that held every block so far; it stops when that set is empty.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    nodes: NodeTable,
    endpoints: Vec<Option<EndpointBlocks>>,
    slots: HashMap<EndpointId, u32>,
    free: Vec<u32>,
    entries: usize,
    /// No per-endpoint sets (`PrefixIndex::without_endpoint_sets`).
    lean: bool,
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index that keeps no set of each endpoint's blocks, for an owner that keeps
    /// them itself (the approximate index's LRUs): a store or removal then updates one map
    /// instead of two, which is most of recording a routed prompt. Clearing or dropping an
    /// endpoint costs a scan of every block unless its blocks were removed first.
    pub fn without_endpoint_sets() -> Self {
        Self {
            lean: true,
            ..Self::default()
        }
    }

    /// Distinct blocks held by anyone.
    pub fn blocks(&self) -> usize {
        self.nodes.len()
    }

    /// (block, endpoint) pairs held.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Blocks `endpoint` holds.
    pub fn endpoint_blocks(&self, endpoint: &EndpointId) -> usize {
        self.slots
            .get(endpoint)
            .and_then(|&s| self.endpoint(s))
            .map_or(0, |e| e.held)
    }

    /// Endpoints known to the index, in no particular order.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointId> {
        self.slots.keys()
    }

    /// The tiers `endpoint` holds `block` in (empty when it does not hold it).
    pub fn tiers(&self, endpoint: &EndpointId, block: BlockHash) -> Vec<Tier> {
        let mask = self
            .slots
            .get(endpoint)
            .and_then(|&s| self.nodes.get(block.0).map(|h| h.tiers(s)))
            .unwrap_or(0);
        Tier::ALL
            .into_iter()
            .filter(|t| mask & t.bit() != 0)
            .collect()
    }

    /// How many of `blocks`, from the first, `endpoint` holds in any tier: a run that
    /// continues another index's match from where it stopped.
    pub fn held_run(&self, endpoint: &EndpointId, blocks: &[BlockHash]) -> usize {
        // A first block nobody holds answers before the endpoint's name is hashed: asked for
        // every endpoint a precise match names, most are answered so.
        let Some(first) = blocks.first().and_then(|b| self.nodes.get(b.0)) else {
            return 0;
        };
        let Some(&slot) = self.slots.get(endpoint) else {
            return 0;
        };
        if first.tiers(slot) == 0 {
            return 0;
        }
        1 + blocks[1..]
            .iter()
            .take_while(|b| self.nodes.get(b.0).is_some_and(|h| h.tiers(slot) != 0))
            .count()
    }

    fn endpoint(&self, slot: u32) -> Option<&EndpointBlocks> {
        self.endpoints.get(slot as usize)?.as_ref()
    }

    fn slot(&mut self, endpoint: &EndpointId) -> u32 {
        if let Some(&s) = self.slots.get(endpoint) {
            return s;
        }
        let blocks = EndpointBlocks {
            id: endpoint.clone(),
            blocks: Set::default(),
            held: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.endpoints[s as usize] = Some(blocks);
                s
            }
            None => {
                self.endpoints.push(Some(blocks));
                // Slots stay far below 2^29 (the holder word's limit): one per endpoint.
                u32::try_from(self.endpoints.len() - 1).unwrap_or(u32::MAX >> holders::TIER_BITS)
            }
        };
        self.slots.insert(endpoint.clone(), slot);
        slot
    }

    /// Records that `endpoint` holds `blocks` in `tier`. Storing a block again adds the tier
    /// (or does nothing). Blocks are keyed by their own chained hash, so a block whose parent
    /// the index has never seen is stored all the same: it is matched once a request's chain
    /// reaches it through blocks the endpoint also holds.
    pub fn store(&mut self, endpoint: &EndpointId, blocks: &[BlockHash], tier: Tier) {
        let slot = self.slot(endpoint);
        let bit = tier.bit();
        let mut added = 0;
        for &BlockHash(h) in blocks {
            let (holders, inserted) = self.nodes.get_or_insert(h, || Holders::new(slot, bit));
            let new = inserted || holders.add(slot, bit);
            if new {
                added += 1;
                if let Some(Some(e)) = self.endpoints.get_mut(slot as usize) {
                    e.held += 1;
                    if !self.lean {
                        e.blocks.insert(h);
                    }
                }
            }
        }
        self.entries += added;
    }

    /// Records that `endpoint` no longer holds `blocks` in `tier` (or in any tier, for
    /// `None`). Blocks it did not hold are ignored. Returns how many blocks it stopped
    /// holding altogether.
    pub fn remove(
        &mut self,
        endpoint: &EndpointId,
        blocks: &[BlockHash],
        tier: Option<Tier>,
    ) -> usize {
        let Some(&slot) = self.slots.get(endpoint) else {
            return 0;
        };
        let mask = tier.map_or(u8::MAX, Tier::bit);
        let mut gone = 0;
        for &BlockHash(h) in blocks {
            if self.remove_one(slot, h, mask) {
                gone += 1;
                if let Some(Some(e)) = self.endpoints.get_mut(slot as usize) {
                    e.held -= 1;
                    if !self.lean {
                        e.blocks.remove(&h);
                    }
                }
            }
        }
        self.entries -= gone;
        gone
    }

    /// Removes `mask` tiers of `slot` from block `h`; true when the slot no longer holds it.
    fn remove_one(&mut self, slot: u32, h: u64, mask: u8) -> bool {
        let Some(holders) = self.nodes.get_mut(h) else {
            return false;
        };
        let (_, dropped) = holders.remove(slot, mask);
        if holders.is_empty() {
            self.nodes.remove(h);
        }
        dropped
    }

    /// Forgets every block `endpoint` holds (vLLM's `AllBlocksCleared`, or a restart), in
    /// O(its blocks). The endpoint stays known.
    pub fn clear(&mut self, endpoint: &EndpointId) -> usize {
        let Some(&slot) = self.slots.get(endpoint) else {
            return 0;
        };
        let Some(Some(e)) = self.endpoints.get_mut(slot as usize) else {
            return 0;
        };
        let n = std::mem::take(&mut e.held);
        let blocks = std::mem::take(&mut e.blocks);
        if self.lean && n > 0 {
            // No set to walk: find its blocks among all of them.
            let held: Vec<u64> = self
                .nodes
                .iter()
                .filter(|(_, holders)| holders.tiers(slot) != 0)
                .map(|(h, _)| h)
                .collect();
            for h in held {
                self.remove_one(slot, h, u8::MAX);
            }
        } else {
            for h in blocks {
                self.remove_one(slot, h, u8::MAX);
            }
        }
        self.entries -= n;
        n
    }

    /// Forgets `endpoint` altogether (it left the pool). Returns the blocks it held.
    pub fn remove_endpoint(&mut self, endpoint: &EndpointId) -> usize {
        let n = self.clear(endpoint);
        if let Some(slot) = self.slots.remove(endpoint) {
            self.endpoints[slot as usize] = None;
            self.free.push(slot);
        }
        n
    }

    /// For a request whose blocks hash to `blocks`, the endpoints holding at least its first
    /// block, each with the number of consecutive blocks from the start it holds. One pass
    /// over the hashes, stopping as soon as no endpoint holds the next block.
    ///
    /// Consecutive blocks with exactly the same holders (a shared system prompt cached on
    /// many endpoints) are counted as a run, so their cost is one slice comparison each
    /// rather than a pass over every endpoint still matching.
    pub fn match_prefix(&self, blocks: &[BlockHash]) -> Vec<EndpointMatch> {
        let mut out = Vec::new();
        self.match_prefix_into(blocks, &mut MatchScratch::default(), &mut out);
        out
    }

    /// [`Self::match_prefix`] into `out` (cleared first), with `scratch` reused between
    /// calls: a warm caller allocates nothing.
    pub fn match_prefix_into(
        &self,
        blocks: &[BlockHash],
        scratch: &mut MatchScratch,
        out: &mut Vec<EndpointMatch>,
    ) {
        out.clear();
        let active = &mut scratch.active;
        active.clear();
        let Some((first, rest)) = blocks.split_first() else {
            return;
        };
        for b in blocks.iter().take(PREFETCH) {
            self.nodes.prefetch(b.0);
        }
        let Some(holders) = self.nodes.get(first.0) else {
            return;
        };
        let mut prev = holders.as_slice();
        // Endpoints that held every block so far, sorted by slot like every holder list.
        active.extend(prev.iter().map(|&w| {
            let tier = Tier::best(holders::tiers_of(w));
            let mut counts = [0; 3];
            counts[tier] = 1;
            Active {
                slot: holders::slot_of(w),
                tier,
                counts,
            }
        }));
        // Blocks since `prev` changed whose holders equal `prev`: not yet counted.
        let mut run = 0;
        for (i, &BlockHash(h)) in rest.iter().enumerate() {
            // Ask for a block PREFETCH ahead, so its slot is in cache by the time it is read.
            if let Some(ahead) = rest.get(i + PREFETCH) {
                self.nodes.prefetch(ahead.0);
            }
            let Some(holders) = self.nodes.get(h) else {
                break;
            };
            let words = holders.as_slice();
            if words == prev {
                run += 1;
                continue;
            }
            flush(active, &mut run);
            let mut k = 0;
            let mut kept = 0;
            for i in 0..active.len() {
                let mut a = active[i];
                while k < words.len() && holders::slot_of(words[k]) < a.slot {
                    k += 1;
                }
                if k < words.len() && holders::slot_of(words[k]) == a.slot {
                    a.tier = Tier::best(holders::tiers_of(words[k]));
                    a.counts[a.tier] += 1;
                    active[kept] = a;
                    kept += 1;
                } else {
                    self.emit(a.slot, a.counts, out);
                }
            }
            active.truncate(kept);
            if active.is_empty() {
                return;
            }
            prev = words;
        }
        flush(active, &mut run);
        for a in active.iter() {
            self.emit(a.slot, a.counts, out);
        }
    }

    fn emit(&self, slot: u32, per_tier: [u32; 3], out: &mut Vec<EndpointMatch>) {
        if let Some(e) = self.endpoint(slot) {
            out.push(EndpointMatch {
                endpoint: e.id.clone(),
                blocks: per_tier.iter().sum(),
                per_tier,
            });
        }
    }
}

/// How many blocks ahead `match_prefix` prefetches: enough to cover a memory miss with the
/// work of that many lookups (measured: `docs/index.md`).
const PREFETCH: usize = 8;

/// Working memory of [`PrefixIndex::match_prefix_into`], kept by a caller that matches
/// often so that matching allocates nothing once warm.
#[derive(Debug, Default)]
pub struct MatchScratch {
    active: Vec<Active>,
}

/// An endpoint still matching: its slot, the tier of the last block counted, and the
/// blocks counted per tier.
#[derive(Clone, Copy, Debug)]
struct Active {
    slot: u32,
    tier: usize,
    counts: [u32; 3],
}

/// Adds a run of blocks identical in holders and tiers to the last counted one.
fn flush(active: &mut [Active], run: &mut u32) {
    if *run > 0 {
        for a in active.iter_mut() {
            a.counts[a.tier] += *run;
        }
        *run = 0;
    }
}

#[cfg(test)]
mod tests;
