//! The endpoints holding one block, packed: each holder is one `u32`, the endpoint's slot
//! shifted left by [`TIER_BITS`] with a bit per tier it holds the block in. Most blocks have
//! one or two holders, kept inline; more spill to a sorted vector.

/// Bits of a holder word that carry tiers.
pub(crate) const TIER_BITS: u32 = 3;
const TIER_MASK: u32 = (1 << TIER_BITS) - 1;

pub(crate) fn word(slot: u32, tiers: u8) -> u32 {
    (slot << TIER_BITS) | (u32::from(tiers) & TIER_MASK)
}

pub(crate) fn slot_of(word: u32) -> u32 {
    word >> TIER_BITS
}

pub(crate) fn tiers_of(word: u32) -> u8 {
    (word & TIER_MASK) as u8
}

/// Holder words sorted by slot; empty only between a removal and the caller dropping the
/// node. The spilled vector is boxed on purpose: a thin pointer keeps `Holders` at 16 bytes
/// (a plain `Vec` would make every node 24), and spilling is rare.
#[derive(Clone, Debug)]
#[allow(clippy::box_collection)]
pub(crate) enum Holders {
    /// The last holder left; the node is about to be dropped. Its own variant so that
    /// emptying a node allocates nothing.
    Empty,
    One(u32),
    Two([u32; 2]),
    Many(Box<Vec<u32>>),
}

impl Holders {
    pub(crate) fn new(slot: u32, tiers: u8) -> Self {
        Self::One(word(slot, tiers))
    }

    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            Self::Empty => &[],
            Self::One(w) => std::slice::from_ref(w),
            Self::Two(ws) => ws,
            Self::Many(v) => v,
        }
    }

    fn position(&self, slot: u32) -> Result<usize, usize> {
        self.as_slice().binary_search_by_key(&slot, |w| slot_of(*w))
    }

    /// Tiers `slot` holds the block in (0 when it does not hold it).
    pub(crate) fn tiers(&self, slot: u32) -> u8 {
        self.position(slot)
            .map_or(0, |i| tiers_of(self.as_slice()[i]))
    }

    /// Adds `tiers` for `slot`; returns whether `slot` was not a holder before.
    pub(crate) fn add(&mut self, slot: u32, tiers: u8) -> bool {
        match self.position(slot) {
            Ok(i) => {
                let w = self.as_slice()[i] | u32::from(tiers);
                self.set(i, w);
                false
            }
            Err(i) => {
                self.insert(i, word(slot, tiers));
                true
            }
        }
    }

    /// Removes `tiers` of `slot`. Returns `(held before, holds no tier any more)`; when the
    /// second is true the holder is gone. The caller drops the node when [`Self::is_empty`].
    pub(crate) fn remove(&mut self, slot: u32, tiers: u8) -> (bool, bool) {
        let Ok(i) = self.position(slot) else {
            return (false, false);
        };
        let left = tiers_of(self.as_slice()[i]) & !tiers;
        if left != 0 {
            self.set(i, word(slot, left));
            return (true, false);
        }
        self.delete(i);
        (true, true)
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Many(v) => v.is_empty(),
            Self::One(_) | Self::Two(_) => false,
        }
    }

    fn set(&mut self, i: usize, w: u32) {
        match self {
            // `position` finds nothing in an empty set, so nothing is set there.
            Self::Empty => {}
            Self::One(x) => *x = w,
            Self::Two(xs) => xs[i] = w,
            Self::Many(v) => v[i] = w,
        }
    }

    fn insert(&mut self, i: usize, w: u32) {
        *self = match std::mem::replace(self, Self::Empty) {
            Self::Empty => Self::One(w),
            Self::One(x) => {
                if i == 0 {
                    Self::Two([w, x])
                } else {
                    Self::Two([x, w])
                }
            }
            Self::Two(xs) => {
                let mut v = Vec::with_capacity(4);
                v.extend_from_slice(&xs);
                v.insert(i, w);
                Self::Many(Box::new(v))
            }
            Self::Many(mut v) => {
                v.insert(i, w);
                Self::Many(v)
            }
        };
    }

    fn delete(&mut self, i: usize) {
        *self = match std::mem::replace(self, Self::Empty) {
            Self::Empty | Self::One(_) => Self::Empty,
            Self::Two(xs) => Self::One(xs[1 - i]),
            Self::Many(mut v) => {
                v.remove(i);
                match v.as_slice() {
                    [a, b] => Self::Two([*a, *b]),
                    _ => Self::Many(v),
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks_keeping_order() {
        let mut h = Holders::new(5, 1);
        assert!(h.add(2, 1));
        assert!(h.add(9, 2));
        assert!(h.add(7, 4));
        assert!(!h.add(7, 1), "already a holder");
        let slots: Vec<u32> = h.as_slice().iter().map(|w| slot_of(*w)).collect();
        assert_eq!(slots, [2, 5, 7, 9]);
        assert_eq!(h.tiers(7), 5);
        assert_eq!(h.remove(7, 4), (true, false));
        assert_eq!(h.tiers(7), 1);
        assert_eq!(h.remove(3, 1), (false, false));
        assert_eq!(h.remove(7, 7), (true, true));
        assert_eq!(h.remove(9, 7), (true, true));
        assert!(matches!(h, Holders::Two(_)));
        assert_eq!(h.remove(2, 1), (true, true));
        assert!(matches!(h, Holders::One(_)));
        assert_eq!(h.remove(5, 1), (true, true));
        assert!(h.is_empty());
        assert_eq!(std::mem::size_of::<Holders>(), 16);
    }
}
