//! The hasher of the index's maps. Keys are already good 64-bit hashes, so SipHash would be
//! wasted work; a multiply with a per-process random key spreads them over the buckets and
//! keeps crafted prompts from aiming at one bucket.

use std::hash::{BuildHasher, Hasher};

/// Builds the hasher of maps keyed by 64-bit hashes: one keyed multiply per key instead of
/// SipHash's rounds, still unpredictable to whoever crafts the keys.
#[derive(Clone, Copy, Debug)]
pub struct KeyHasher {
    key: u64,
}

impl Default for KeyHasher {
    fn default() -> Self {
        // RandomState is seeded from the OS once per process; one draw gives our key.
        let key =
            std::collections::hash_map::RandomState::new().hash_one(0x006b_7672_6f75_7465_u64);
        Self { key: key | 1 }
    }
}

impl KeyHasher {
    /// The keyed mix of one 64-bit key: a folded 64×64→128-bit multiply.
    pub(crate) fn mix(&self, x: u64) -> u64 {
        let m = u128::from(x) * u128::from(self.key);
        (m as u64) ^ ((m >> 64) as u64)
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = KeyState;

    fn build_hasher(&self) -> KeyState {
        KeyState {
            key: self.key,
            h: 0,
        }
    }
}

/// The state of one [`KeyHasher`] hash.
#[derive(Debug)]
pub struct KeyState {
    key: u64,
    h: u64,
}

impl Hasher for KeyState {
    fn finish(&self) -> u64 {
        self.h
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let m = u128::from(self.h ^ x) * u128::from(self.key);
        self.h = (m as u64) ^ ((m >> 64) as u64);
    }
}

/// A map keyed by 64-bit hashes.
pub type Map<V> = std::collections::HashMap<u64, V, KeyHasher>;
/// A set of 64-bit hashes.
pub type Set = std::collections::HashSet<u64, KeyHasher>;
