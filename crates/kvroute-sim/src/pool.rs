//! The KV-cache block pool, as vLLM's `BlockPool`: blocks with reference counts, a map from
//! content hash to the cached block, and a queue of free blocks in eviction order. A freed
//! block keeps its content (and stays findable by hash) until it is taken for new content.

use crate::table::HashTable;

use std::collections::VecDeque;

/// A free-queue entry whose block was taken out of the queue (a cache hit).
const DEAD: u32 = u32::MAX;

/// How many allocations ahead the table slot of an eviction is prefetched.
const PREFETCH: usize = 32;

#[derive(Clone, Debug)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    /// Where the block's entry is in the free queue (a running count), while it is free.
    pos: u64,
    free: bool,
}

/// The free queue is a ring of `(block, hash)` entries in the order blocks were freed;
/// vLLM's is a doubly linked list from which a cache hit unlinks its block. Here a hit marks
/// the block's entry dead (the block knows where it is), and taking the least recently
/// freed block reads the ring's front: sequential memory, with the hash to evict at hand,
/// where the list made every allocation wait on a random block record (41% of a 16-token
/// replay's time in `perf`). Same order, same evictions.
#[derive(Debug)]
pub(crate) struct Pool {
    blocks: Vec<Block>,
    cached: HashTable,
    queue: VecDeque<(u32, Option<u64>)>,
    /// The running count of the queue's front entry.
    front: u64,
    free: usize,
}

impl Pool {
    pub(crate) fn new(n: usize) -> Self {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX - 1);
        Self {
            blocks: (0..n32)
                .map(|i| Block {
                    refs: 0,
                    hash: None,
                    pos: u64::from(i),
                    free: true,
                })
                .collect(),
            cached: HashTable::with_capacity(n),
            queue: (0..n32).map(|i| (i, None)).collect(),
            front: 0,
            free: n32 as usize,
        }
    }

    /// Blocks that can be handed out now (free, cached or not).
    pub(crate) fn free_blocks(&self) -> usize {
        self.free
    }

    /// Blocks in use by running requests.
    pub(crate) fn used_blocks(&self) -> usize {
        self.blocks.len() - self.free
    }

    pub(crate) fn capacity(&self) -> usize {
        self.blocks.len()
    }

    /// The cached block with content `hash`, if any.
    pub(crate) fn lookup(&self, hash: u64) -> Option<u32> {
        self.cached.get(hash)
    }

    /// Whether block `id` is in the free queue (unused, maybe holding cached content).
    pub(crate) fn is_free(&self, id: u32) -> bool {
        self.blocks[id as usize].free
    }

    /// Every cached content hash (for tests and state dumps).
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.cached.keys()
    }

    /// Starts loading what caching `hash` and releasing block `id` will touch, ahead of
    /// time (a hint).
    pub(crate) fn prefetch(&self, hash: Option<u64>, id: Option<u32>) {
        if let Some(h) = hash {
            self.cached.prefetch(h);
        }
        if let Some(b) = id.and_then(|i| self.blocks.get(i as usize)) {
            crate::table::prefetch(b);
        }
    }

    /// Takes a reference on a cached block (a prefix-cache hit), out of the free queue.
    pub(crate) fn touch(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if b.free {
            b.free = false;
            self.free -= 1;
            // Invariant: a free block's entry is in the queue, at `pos`.
            let at = (b.pos - self.front) as usize;
            self.queue[at].0 = DEAD;
        }
        b.refs += 1;
    }

    /// Takes the least recently freed block for new content. Returns it and the hash it
    /// held, whose cached content is now gone (a `BlockRemoved`).
    pub(crate) fn allocate(&mut self) -> Option<(u32, Option<u64>)> {
        if self.free == 0 {
            return None;
        }
        // A few allocations from now, this entry's content is evicted: load its table slot.
        if let Some(&(_, Some(h))) = self.queue.get(PREFETCH) {
            self.cached.prefetch(h);
        }
        loop {
            let (id, evicted) = self.queue.pop_front()?;
            self.front += 1;
            if id == DEAD {
                continue;
            }
            let b = &mut self.blocks[id as usize];
            b.free = false;
            b.refs = 1;
            b.hash = None;
            self.free -= 1;
            if let Some(h) = evicted {
                self.cached.remove(h);
            }
            return Some((id, evicted));
        }
    }

    /// Records that block `id` now holds content `hash`. Returns false (and caches nothing)
    /// when another block already holds that content.
    pub(crate) fn cache(&mut self, id: u32, hash: u64) -> bool {
        if !self.cached.insert_new(hash, id) {
            return false;
        }
        self.blocks[id as usize].hash = Some(hash);
        true
    }

    /// Drops a reference; a block nobody uses joins the end of the free queue, keeping its
    /// content. Callers free a request's blocks last block first, so a sequence's tail is
    /// evicted before its beginning.
    pub(crate) fn release(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        b.refs = b.refs.saturating_sub(1);
        if b.refs == 0 && !b.free {
            b.free = true;
            b.pos = self.front + self.queue.len() as u64;
            self.queue.push_back((id, b.hash));
            self.free += 1;
        }
    }

    /// Forgets every cached content (vLLM's `reset_prefix_cache`); blocks in use keep
    /// their data but are no longer findable.
    pub(crate) fn clear(&mut self) {
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        for entry in &mut self.queue {
            entry.1 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against vLLM's structure, a list of free blocks in the order freed from which a
        /// hit unlinks its block: the same blocks come out in the same order with the same
        /// evicted content.
        #[test]
        fn evicts_like_an_ordered_free_list(ops in prop::collection::vec((0u8..4, 0u32..8), 1..300)) {
            let n = 8u32;
            let mut pool = Pool::new(n as usize);
            let mut list: VecDeque<u32> = (0..n).collect();
            let mut refs = vec![0u32; n as usize];
            let mut content: HashMap<u32, u64> = HashMap::new();
            let mut next_hash = 100u64;
            for (op, id) in ops {
                match op {
                    0 => {
                        let want = list.pop_front().map(|b| (b, content.remove(&b)));
                        if let Some((b, _)) = want {
                            refs[b as usize] = 1;
                        }
                        prop_assert_eq!(pool.allocate(), want);
                    }
                    1 if refs[id as usize] > 0 && !content.contains_key(&id) => {
                        next_hash += 1;
                        prop_assert!(pool.cache(id, next_hash));
                        content.insert(id, next_hash);
                    }
                    2 if refs[id as usize] > 0 => {
                        refs[id as usize] -= 1;
                        if refs[id as usize] == 0 {
                            list.push_back(id);
                        }
                        pool.release(id);
                    }
                    3 if content.contains_key(&id) => {
                        // A prefix-cache hit on cached content, free or in use.
                        if refs[id as usize] == 0 {
                            list.retain(|&b| b != id);
                        }
                        refs[id as usize] += 1;
                        pool.touch(id);
                    }
                    _ => {}
                }
                prop_assert_eq!(pool.free_blocks(), list.len());
                for b in 0..n {
                    prop_assert_eq!(pool.is_free(b), list.contains(&b));
                }
            }
        }
    }

    #[test]
    fn freed_blocks_keep_content_until_reused_in_lru_order() {
        let mut p = Pool::new(3);
        let (a, _) = p.allocate().unwrap();
        let (b, _) = p.allocate().unwrap();
        assert!(p.cache(a, 10));
        assert!(p.cache(b, 11));
        assert!(!p.cache(b, 10), "content already cached elsewhere");
        p.release(b);
        p.release(a);
        assert_eq!(p.free_blocks(), 3);
        assert_eq!(p.lookup(10), Some(a));
        p.touch(a);
        assert_eq!(p.free_blocks(), 2);
        // Free queue: [2 (never used), b]; a is in use.
        assert_eq!(p.allocate().unwrap(), (2, None));
        assert_eq!(
            p.allocate().unwrap(),
            (b, Some(11)),
            "b's content is evicted"
        );
        assert_eq!(p.lookup(11), None);
        assert!(p.allocate().is_none());
        assert_eq!(p.used_blocks(), 3);
        p.clear();
        assert_eq!(p.hashes().count(), 0);
    }
}
