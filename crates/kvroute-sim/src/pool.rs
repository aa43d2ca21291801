//! The KV-cache block pool, as vLLM's `BlockPool`: blocks with reference counts, a map from
//! content hash to the cached block, and a queue of free blocks in eviction order. A freed
//! block keeps its content (and stays findable by hash) until it is taken for new content.

use crate::table::HashTable;

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
    free: bool,
}

#[derive(Debug)]
pub(crate) struct Pool {
    blocks: Vec<Block>,
    cached: HashTable,
    head: u32,
    tail: u32,
    free: usize,
}

impl Pool {
    pub(crate) fn new(n: usize) -> Self {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX - 1);
        let blocks = (0..n32)
            .map(|i| Block {
                refs: 0,
                hash: None,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n32 { NONE } else { i + 1 },
                free: true,
            })
            .collect();
        Self {
            blocks,
            cached: HashTable::with_capacity(n),
            head: if n32 == 0 { NONE } else { 0 },
            tail: if n32 == 0 { NONE } else { n32 - 1 },
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

    /// Takes a reference on a cached block (a prefix-cache hit), out of the free queue.
    pub(crate) fn touch(&mut self, id: u32) {
        if self.blocks[id as usize].free {
            self.unlink(id);
        }
        self.blocks[id as usize].refs += 1;
    }

    /// Takes the least recently freed block for new content. Returns it and the hash it
    /// held, whose cached content is now gone (a `BlockRemoved`).
    pub(crate) fn allocate(&mut self) -> Option<(u32, Option<u64>)> {
        let id = self.head;
        if id == NONE {
            return None;
        }
        self.unlink(id);
        let b = &mut self.blocks[id as usize];
        b.refs = 1;
        let evicted = b.hash.take();
        if let Some(h) = evicted {
            self.cached.remove(h);
        }
        Some((id, evicted))
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
            self.push_back(id);
        }
    }

    /// Forgets every cached content (vLLM's `reset_prefix_cache`); blocks in use keep
    /// their data but are no longer findable.
    pub(crate) fn clear(&mut self) {
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NONE {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NONE;
        b.next = NONE;
        b.free = false;
        self.free -= 1;
    }

    fn push_back(&mut self, id: u32) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NONE;
            b.free = true;
        }
        if tail == NONE {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
