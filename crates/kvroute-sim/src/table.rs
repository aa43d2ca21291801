//! Hash → block id, open addressing with linear probing and backward-shift deletion.
//! `kvroute-index` has a table of the same design for its nodes; the simulator keeps its
//! own because it must not import the router's crates (DESIGN.md, "Boundaries").
//!
//! The simulator caches and evicts about as many blocks as it computes (10^9 for a million
//! trace requests). With std's `HashMap`, that churn fills the table with tombstones and
//! removal became half of the simulator's run time (measured with `perf`); backward-shift
//! deletion leaves none. The table never grows: it is sized for the pool, at most 1/16
//! full. So sparse because synthetic content is named so that a 512-token unit's 32 blocks
//! take 32 neighbouring slots (one cache line per four): units that land on the same
//! slots push each other along, and at half full those runs merged into long probe chains
//! (`perf` showed probing as most of the run). 1/16 costs 256 bytes a block and removed
//! them (measured: `docs/benchmarks.md`, simulator).

const EMPTY: u64 = 0;

/// A key and its value side by side, so a probe and the write that follows touch one cache
/// line, not two.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: u64,
    value: u32,
}

/// Asks the CPU to start loading the cache line at `p` (a hint: nothing is read).
#[inline]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `_mm_prefetch` only hints the cache and never dereferences (an invalid
        // address is ignored); SSE is part of every x86_64 target.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[derive(Debug)]
pub(crate) struct HashTable {
    entries: Vec<Entry>,
    mask: usize,
    len: usize,
    /// The value for key 0, which marks empty slots.
    zero: Option<u32>,
}

impl HashTable {
    /// Room for `n` keys, at most 1/16 full.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let size = (n.max(1) * 16).next_power_of_two();
        Self {
            entries: vec![
                Entry {
                    key: EMPTY,
                    value: 0
                };
                size
            ],
            mask: size - 1,
            len: 0,
            zero: None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    /// Keys are already well mixed (XXH3 of tokens, or a unit name above a block index), so
    /// their low bits are the home slot: the blocks of one synthetic unit land side by side.
    fn home(&self, key: u64) -> usize {
        key as usize & self.mask
    }

    fn find(&self, key: u64) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            let k = self.entries[i].key;
            if k == key {
                return (i, true);
            }
            if k == EMPTY {
                return (i, false);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Asks the CPU to start loading `key`'s home slot, so that a later `get`, `insert_new`
    /// or `remove` of it does not wait on memory.
    #[inline]
    pub(crate) fn prefetch(&self, key: u64) {
        prefetch(self.entries.as_ptr().wrapping_add(self.home(key)));
    }

    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        if key == EMPTY {
            return self.zero;
        }
        match self.find(key) {
            (i, true) => Some(self.entries[i].value),
            _ => None,
        }
    }

    /// Inserts `key → value` unless `key` is present; returns whether it inserted.
    pub(crate) fn insert_new(&mut self, key: u64, value: u32) -> bool {
        if key == EMPTY {
            if self.zero.is_some() {
                return false;
            }
            self.zero = Some(value);
            return true;
        }
        match self.find(key) {
            (_, true) => false,
            (i, false) => {
                self.entries[i] = Entry { key, value };
                self.len += 1;
                true
            }
        }
    }

    pub(crate) fn remove(&mut self, key: u64) {
        if key == EMPTY {
            self.zero = None;
            return;
        }
        let (mut hole, true) = self.find(key) else {
            return;
        };
        let mut j = (hole + 1) & self.mask;
        while self.entries[j].key != EMPTY {
            let home = self.home(self.entries[j].key);
            // Move j into the hole unless its home lies after the hole (cyclically).
            if j.wrapping_sub(home) & self.mask >= j.wrapping_sub(hole) & self.mask {
                self.entries[hole] = self.entries[j];
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        self.entries[hole].key = EMPTY;
        self.len -= 1;
    }

    pub(crate) fn clear(&mut self) {
        self.entries.iter_mut().for_each(|e| e.key = EMPTY);
        self.len = 0;
        self.zero = None;
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .map(|e| e.key)
            .filter(|&k| k != EMPTY)
            .chain(self.zero.map(|_| EMPTY))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a HashMap, with few keys crowding few slots, deletions inside probe runs,
        /// and the zero key.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..40, any::<bool>(), 0u32..100), 1..400)) {
            let mut t = HashTable::with_capacity(40);
            let mut m: HashMap<u64, u32> = HashMap::new();
            for (k, insert, v) in ops {
                if insert {
                    let new = !m.contains_key(&k);
                    if new {
                        m.insert(k, v);
                    }
                    prop_assert_eq!(t.insert_new(k, v), new);
                } else {
                    t.remove(k);
                    m.remove(&k);
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for k in 0..40 {
                prop_assert_eq!(t.get(k), m.get(&k).copied());
            }
            let mut keys: Vec<u64> = t.keys().collect();
            keys.sort_unstable();
            let mut want: Vec<u64> = m.keys().copied().collect();
            want.sort_unstable();
            prop_assert_eq!(keys, want);
        }
    }
}
