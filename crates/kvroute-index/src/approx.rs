use std::collections::HashMap;

use kvroute_core::{BlockHash, EndpointId};

use crate::hasher::Map;
use crate::index::{EndpointMatch, MatchScratch, PrefixIndex, Tier};

/// Blocks remembered per endpoint unless configured otherwise: the Gateway API Inference
/// Extension's `lruCapacityPerServer` (31,250 blocks of 64 characters: ~500k tokens, what an
/// 80 GB GPU holds for an 8B model after its weights).
pub const DEFAULT_LRU_CAPACITY: usize = 31_250;

const NIL: u32 = u32::MAX;

/// One recorded block in an endpoint's recency list.
#[derive(Clone, Copy, Debug)]
struct Node {
    hash: u64,
    at_ms: u64,
    prev: u32,
    next: u32,
}

/// One endpoint's recency list: a doubly linked list in a slab (least recent at `head`)
/// and a map from block to its node, so recording, refreshing and evicting a block each cost
/// O(1) with no periodic clean-up under the write lock.
#[derive(Debug)]
struct Lru {
    index: Map<u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Self {
            index: Map::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

/// A guess of what each endpoint caches, built from where requests were sent: the blocks of
/// each routed request are recorded against its endpoint, at most `capacity` blocks per
/// endpoint (least recently recorded evicted first) and, with a TTL, for at most that long.
#[derive(Debug)]
pub struct ApproxIndex {
    index: PrefixIndex,
    lru: HashMap<EndpointId, Lru>,
    capacity: usize,
    /// Endpoints whose capacity is their own (sized from what the pod reports).
    capacities: HashMap<EndpointId, usize>,
    ttl_ms: Option<u64>,
    /// Hashes an eviction drops, kept between calls so that recording allocates nothing.
    evicted: Vec<BlockHash>,
}

impl ApproxIndex {
    /// At most `capacity` blocks per endpoint; entries older than `ttl_ms` (if given) expire.
    pub fn new(capacity: usize, ttl_ms: Option<u64>) -> Self {
        Self {
            // Each endpoint's LRU lists its blocks; the index need not too.
            index: PrefixIndex::without_endpoint_sets(),
            lru: HashMap::new(),
            capacity: capacity.max(1),
            capacities: HashMap::new(),
            ttl_ms,
            evicted: Vec::new(),
        }
    }

    /// The exact index underneath (for sizes and matching).
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// See [`PrefixIndex::match_prefix`]. Entries past their TTL may still match until the
    /// next [`Self::record`] or [`Self::expire`] removes them.
    pub fn match_prefix(&self, blocks: &[BlockHash]) -> Vec<EndpointMatch> {
        self.index.match_prefix(blocks)
    }

    /// See [`PrefixIndex::match_prefix_into`].
    pub fn match_prefix_into(
        &self,
        blocks: &[BlockHash],
        scratch: &mut MatchScratch,
        out: &mut Vec<EndpointMatch>,
    ) {
        self.index.match_prefix_into(blocks, scratch, out);
    }

    /// See [`PrefixIndex::held_run`].
    pub fn held_run(&self, endpoint: &EndpointId, blocks: &[BlockHash]) -> usize {
        self.index.held_run(endpoint, blocks)
    }

    /// Records that a request with `blocks` was sent to `endpoint` at `now_ms`. The prefix
    /// is marked most recent, so an endpoint loses the tails of old prompts before their
    /// shared beginnings, as a model server's LRU does.
    pub fn record(&mut self, endpoint: &EndpointId, blocks: &[BlockHash], now_ms: u64) {
        self.index.store(endpoint, blocks, Tier::Gpu);
        let capacity = self.capacity_of(endpoint);
        let lru = self.lru.entry(endpoint.clone()).or_default();
        for &BlockHash(h) in blocks.iter().rev() {
            lru.touch(h, now_ms);
        }
        let mut evicted = std::mem::take(&mut self.evicted);
        lru.evict(
            capacity,
            self.ttl_ms.map(|t| now_ms.saturating_sub(t)),
            &mut evicted,
        );
        self.index.remove(endpoint, &evicted, None);
        evicted.clear();
        self.evicted = evicted;
    }

    /// Drops, for every endpoint, the entries older than the TTL as of `now_ms`. Call it now
    /// and then so endpoints that receive no traffic also forget.
    pub fn expire(&mut self, now_ms: u64) {
        let Some(ttl) = self.ttl_ms else { return };
        let before = now_ms.saturating_sub(ttl);
        let mut evicted = std::mem::take(&mut self.evicted);
        for (endpoint, lru) in &mut self.lru {
            lru.evict(usize::MAX, Some(before), &mut evicted);
            self.index.remove(endpoint, &evicted, None);
            evicted.clear();
        }
        self.evicted = evicted;
    }

    /// How many blocks `endpoint` may hold.
    pub fn capacity_of(&self, endpoint: &EndpointId) -> usize {
        self.capacities
            .get(endpoint)
            .copied()
            .unwrap_or(self.capacity)
    }

    /// Gives `endpoint` a capacity of its own (at least 1 block), dropping its least recent
    /// blocks now if it holds more.
    pub fn set_capacity(&mut self, endpoint: &EndpointId, blocks: usize) {
        let blocks = blocks.max(1);
        if self.capacities.get(endpoint) == Some(&blocks) {
            return;
        }
        self.capacities.insert(endpoint.clone(), blocks);
        if let Some(lru) = self.lru.get_mut(endpoint) {
            let mut evicted = std::mem::take(&mut self.evicted);
            lru.evict(blocks, None, &mut evicted);
            self.index.remove(endpoint, &evicted, None);
            evicted.clear();
            self.evicted = evicted;
        }
    }

    /// Forgets an endpoint that left the pool.
    pub fn remove_endpoint(&mut self, endpoint: &EndpointId) {
        self.capacities.remove(endpoint);
        // Its blocks, named from its LRU, so the index need not scan for them.
        if let Some(lru) = self.lru.remove(endpoint) {
            let blocks: Vec<BlockHash> = lru.index.keys().map(|&h| BlockHash(h)).collect();
            self.index.remove(endpoint, &blocks, None);
        }
        self.index.remove_endpoint(endpoint);
    }
}

impl Lru {
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Makes `h` the most recent entry, recorded at `at_ms`.
    fn touch(&mut self, h: u64, at_ms: u64) {
        let id = match self.index.get(&h) {
            Some(&id) => {
                self.unlink(id);
                self.nodes[id as usize].at_ms = at_ms;
                id
            }
            None => {
                let node = Node {
                    hash: h,
                    at_ms,
                    prev: NIL,
                    next: NIL,
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.nodes[id as usize] = node;
                        id
                    }
                    None => {
                        self.nodes.push(node);
                        // Fewer than 2^32 blocks per endpoint: capacities are far smaller.
                        u32::try_from(self.nodes.len() - 1).unwrap_or(NIL - 1)
                    }
                };
                self.index.insert(h, id);
                id
            }
        };
        self.push_back(id);
    }

    /// Pops least recent entries while over `capacity` or recorded before `before_ms`.
    /// Unlinks what is over `capacity` or older than `before_ms`, oldest first, appending
    /// its hashes to `evicted` (a buffer the caller reuses).
    fn evict(&mut self, capacity: usize, before_ms: Option<u64>, evicted: &mut Vec<BlockHash>) {
        while self.head != NIL {
            let id = self.head;
            let node = self.nodes[id as usize];
            let expired = before_ms.is_some_and(|b| node.at_ms < b);
            if self.len() <= capacity && !expired {
                break;
            }
            self.unlink(id);
            self.index.remove(&node.hash);
            self.free.push(id);
            evicted.push(BlockHash(node.hash));
        }
    }

    fn unlink(&mut self, id: u32) {
        let Node { prev, next, .. } = self.nodes[id as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_back(&mut self, id: u32) {
        let tail = self.tail;
        {
            let n = &mut self.nodes[id as usize];
            n.prev = tail;
            n.next = NIL;
        }
        if tail == NIL {
            self.head = id;
        } else {
            self.nodes[tail as usize].next = id;
        }
        self.tail = id;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn ep(n: u32) -> EndpointId {
        EndpointId::new(format!("ep-{n}"))
    }

    fn hs(ids: &[u64]) -> Vec<BlockHash> {
        ids.iter().map(|&i| BlockHash(i)).collect()
    }

    fn depth(idx: &ApproxIndex, e: u32, blocks: &[u64]) -> u32 {
        idx.match_prefix(&hs(blocks))
            .into_iter()
            .find(|m| m.endpoint == ep(e))
            .map_or(0, |m| m.blocks)
    }

    #[test]
    fn capacity_evicts_tails_of_old_prompts_first() {
        let mut idx = ApproxIndex::new(4, None);
        idx.record(&ep(1), &hs(&[1, 2, 3]), 0);
        idx.record(&ep(1), &hs(&[1, 5, 6]), 1);
        assert_eq!(
            idx.index().endpoint_blocks(&ep(1)),
            4,
            "5 blocks, capacity 4"
        );
        assert_eq!(depth(&idx, 1, &[1, 2, 3]), 2, "the old tail (3) went first");
        assert_eq!(depth(&idx, 1, &[1, 5, 6]), 3);
    }

    #[test]
    fn an_endpoint_of_its_own_capacity_keeps_that_many_blocks() {
        let mut idx = ApproxIndex::new(4, None);
        idx.set_capacity(&ep(2), 8);
        for e in [1, 2] {
            idx.record(&ep(e), &hs(&[1, 2, 3, 4, 5, 6]), 0);
        }
        assert_eq!(idx.index().endpoint_blocks(&ep(1)), 4, "the default");
        assert_eq!(idx.index().endpoint_blocks(&ep(2)), 6, "its own, 8");
        assert_eq!((idx.capacity_of(&ep(1)), idx.capacity_of(&ep(2))), (4, 8));
        // Shrinking drops the least recent now.
        idx.set_capacity(&ep(2), 3);
        assert_eq!(idx.index().endpoint_blocks(&ep(2)), 3);
        assert_eq!(
            depth(&idx, 2, &[1, 2, 3, 4]),
            3,
            "the prompt's beginning stays"
        );
        // An endpoint that leaves and comes back starts from the default again.
        idx.remove_endpoint(&ep(2));
        assert_eq!(idx.capacity_of(&ep(2)), 4);
    }

    #[test]
    fn ttl_expires_on_record_and_on_expire() {
        let mut idx = ApproxIndex::new(100, Some(1000));
        idx.record(&ep(1), &hs(&[1, 2]), 0);
        idx.record(&ep(2), &hs(&[1, 2]), 0);
        idx.record(&ep(1), &hs(&[7]), 1500);
        assert_eq!(
            depth(&idx, 1, &[1, 2]),
            0,
            "expired when ep-1 recorded again"
        );
        assert_eq!(depth(&idx, 2, &[1, 2]), 2, "ep-2 idle: still there");
        idx.expire(1500);
        assert_eq!(depth(&idx, 2, &[1, 2]), 0);
        assert_eq!(depth(&idx, 1, &[7]), 1);
        idx.expire(2600);
        assert_eq!(idx.index().blocks(), 0);
    }

    #[test]
    fn re_recording_refreshes_and_memory_stays_bounded() {
        let mut idx = ApproxIndex::new(3, None);
        for i in 0..1000 {
            idx.record(&ep(1), &hs(&[1, 2]), i);
            idx.record(&ep(1), &hs(&[100 + i]), i);
        }
        assert_eq!(depth(&idx, 1, &[1, 2]), 2, "refreshed every time");
        let lru = &idx.lru[&ep(1)];
        assert_eq!(lru.len(), 3);
        assert!(lru.nodes.len() <= 4, "freed nodes are reused");
        idx.remove_endpoint(&ep(1));
        assert_eq!(idx.index().blocks(), 0);
    }

    proptest! {
        /// Against a model that keeps, per endpoint, the `cap` most recently recorded blocks,
        /// and with a TTL only those recorded within it as of that endpoint's last record.
        #[test]
        fn behaves_like_a_per_endpoint_lru(records in proptest::collection::vec(
            (0u32..3, proptest::collection::vec(0u64..24, 0..8)), 1..200), cap in 1usize..24,
            ttl in proptest::option::of(1u64..60)) {
            let mut idx = ApproxIndex::new(cap, ttl);
            let mut model: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
            for (t, (e, blocks)) in records.iter().enumerate() {
                let t = t as u64;
                idx.record(&ep(*e), &hs(blocks), t);
                let list = model.entry(*e).or_default();
                for b in blocks.iter().rev() {
                    list.retain(|x| x.0 != *b);
                    list.push((*b, t));
                }
                let excess = list.len().saturating_sub(cap);
                list.drain(..excess);
                if let Some(ttl) = ttl {
                    list.retain(|x| x.1 >= t.saturating_sub(ttl));
                }
            }
            for (e, list) in &model {
                prop_assert_eq!(idx.index().endpoint_blocks(&ep(*e)), list.len());
                for (b, _) in list {
                    prop_assert_eq!(depth(&idx, *e, &[*b]), 1);
                }
            }
        }
    }
}
