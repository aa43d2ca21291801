//! The node table: block hash → holders, open addressing with linear probing and
//! backward-shift deletion, with the key beside its holders, so a lookup touches one cache
//! line (two when a 24-byte slot straddles lines), and a `prefetch` that lets a match ask for the lines of blocks it will look up
//! next while it works on the current one (`docs/index.md`, "Node table").

use crate::hasher::KeyHasher;
use crate::holders::Holders;

/// Key 0 marks an empty slot; a block whose hash is 0 lives in `zero`.
const EMPTY: u64 = 0;

#[derive(Clone, Debug)]
struct Slot {
    key: u64,
    holders: Holders,
}

impl Slot {
    fn empty() -> Self {
        Self {
            key: EMPTY,
            holders: Holders::new(0, 0),
        }
    }
}

#[derive(Debug)]
pub(crate) struct NodeTable {
    slots: Vec<Slot>,
    mask: usize,
    len: usize,
    zero: Option<Holders>,
    hasher: KeyHasher,
}

impl Default for NodeTable {
    fn default() -> Self {
        Self {
            slots: vec![Slot::empty(); 16],
            mask: 15,
            len: 0,
            zero: None,
            hasher: KeyHasher::default(),
        }
    }
}

impl NodeTable {
    pub(crate) fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    fn home(&self, key: u64) -> usize {
        (self.hasher.mix(key) as usize) & self.mask
    }

    fn find(&self, key: u64) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].key;
            if k == key {
                return (i, true);
            }
            if k == EMPTY {
                return (i, false);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Asks the CPU to start loading `key`'s home slot, so a later `get` finds it cached.
    #[inline]
    pub(crate) fn prefetch(&self, key: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let slot = self.slots.as_ptr().wrapping_add(self.home(key));
            // SAFETY: `_mm_prefetch` only hints the cache; it never dereferences (an
            // invalid address is ignored), and SSE is part of every x86_64 target. The
            // address is in bounds anyway: `home` is masked to the table's length.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    pub(crate) fn get(&self, key: u64) -> Option<&Holders> {
        if key == EMPTY {
            return self.zero.as_ref();
        }
        match self.find(key) {
            (i, true) => Some(&self.slots[i].holders),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut Holders> {
        if key == EMPTY {
            return self.zero.as_mut();
        }
        match self.find(key) {
            (i, true) => Some(&mut self.slots[i].holders),
            _ => None,
        }
    }

    /// The holders of `key`, inserting `make()` when absent; `true` when inserted.
    pub(crate) fn get_or_insert(
        &mut self,
        key: u64,
        make: impl FnOnce() -> Holders,
    ) -> (&mut Holders, bool) {
        if key == EMPTY {
            let inserted = self.zero.is_none();
            return (self.zero.get_or_insert_with(make), inserted);
        }
        // Grow past 4/5 full: probe runs stay short (and prefetched) below that, and at
        // 10M blocks the table is then 2^24 slots, 60% full (docs/index.md, "Memory").
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.grow();
        }
        match self.find(key) {
            (i, true) => (&mut self.slots[i].holders, false),
            (i, false) => {
                self.slots[i] = Slot {
                    key,
                    holders: make(),
                };
                self.len += 1;
                (&mut self.slots[i].holders, true)
            }
        }
    }

    /// Every key held with its holders, in table order: a scan of the whole table.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Holders)> {
        self.zero.iter().map(|h| (EMPTY, h)).chain(
            self.slots
                .iter()
                .filter(|s| s.key != EMPTY)
                .map(|s| (s.key, &s.holders)),
        )
    }

    /// Removes `key`, moving later entries of its probe run up (no tombstones).
    pub(crate) fn remove(&mut self, key: u64) {
        if key == EMPTY {
            self.zero = None;
            return;
        }
        let (mut hole, true) = self.find(key) else {
            return;
        };
        let mut j = (hole + 1) & self.mask;
        loop {
            let k = self.slots[j].key;
            if k == EMPTY {
                break;
            }
            let home = self.home(k);
            if j.wrapping_sub(home) & self.mask >= j.wrapping_sub(hole) & self.mask {
                self.slots.swap(hole, j);
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        self.slots[hole] = Slot::empty();
        self.len -= 1;
    }

    fn grow(&mut self) {
        let bigger = vec![Slot::empty(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        self.mask = self.slots.len() - 1;
        for slot in old {
            if slot.key != EMPTY {
                let (i, _) = self.find(slot.key);
                self.slots[i] = slot;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a HashMap, with keys crowding few home slots, growth, deletions inside
        /// probe runs, and the zero key.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..300, any::<bool>(), 0u32..9), 1..600)) {
            let mut t = NodeTable::default();
            let mut m: HashMap<u64, u32> = HashMap::new();
            for (key, insert, slot) in ops {
                t.prefetch(key);
                if insert {
                    let (h, _) = t.get_or_insert(key, || Holders::new(slot, 1));
                    h.add(slot, 1);
                    m.entry(key).or_insert(slot);
                } else {
                    t.remove(key);
                    m.remove(&key);
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for key in 0..300 {
                prop_assert_eq!(t.get(key).is_some(), m.contains_key(&key), "key {}", key);
                if let Some(&slot) = m.get(&key) {
                    prop_assert!(t.get(key).unwrap().tiers(slot) != 0);
                }
            }
        }
    }
}
