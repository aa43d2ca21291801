use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Vocabulary the synthetic token ids are drawn from (Llama 3's size).
const VOCAB: u64 = 128_256;

/// A prompt's token ids, either given or derived from content ids (a Mooncake trace's
/// `hash_ids`: each id names `unit` tokens of shared content), without materialising them:
/// a million trace requests of 15k tokens would otherwise need 60 GB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptTokens {
    /// Token ids as sent.
    Explicit(Arc<[u32]>),
    /// `len` tokens whose `i`-th is a deterministic function of `(ids[i / unit], i % unit)`,
    /// so equal content ids give equal tokens.
    Synthetic {
        /// Content ids, one per `unit` tokens.
        ids: Arc<[u64]>,
        /// Tokens per content id.
        unit: usize,
        /// Prompt length in tokens.
        len: usize,
    },
}

impl PromptTokens {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            Self::Explicit(t) => t.len(),
            Self::Synthetic { len, .. } => *len,
        }
    }

    /// Whether the prompt is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i` (`i < len`).
    pub fn token(&self, i: usize) -> u32 {
        match self {
            Self::Explicit(t) => t[i],
            Self::Synthetic { ids, unit, .. } => {
                let id = ids.get(i / unit).copied().unwrap_or(u64::MAX);
                let h = xxh3_64_with_seed(&((i % unit) as u64).to_le_bytes(), id);
                (h % VOCAB) as u32
            }
        }
    }

    /// Tokens `start..end`.
    pub fn tokens(&self, start: usize, end: usize) -> Vec<u32> {
        match self {
            Self::Explicit(t) => t[start..end].to_vec(),
            Self::Synthetic { .. } => (start..end).map(|i| self.token(i)).collect(),
        }
    }

    /// The engine's chained hashes of the prompt's full blocks of `block_size` tokens,
    /// from `root`: what calling [`PromptTokens::block_hash`] block after block gives, but
    /// for synthetic prompts whose units split into whole blocks without a division per
    /// block (a million long prompts at 16 tokens a block hash ~10^9 blocks).
    pub(crate) fn block_hashes(&self, block_size: usize, root: u64) -> Vec<u64> {
        let n = self.len() / block_size;
        let mut out = Vec::with_capacity(n);
        let mut parent = root;
        match self {
            Self::Synthetic { unit, .. } if unit % block_size == 0 => {
                let per_unit = unit / block_size;
                let mut b = 0;
                while b < n {
                    // The unit's first block names it; the rest follow from it.
                    parent = self.block_hash(b, block_size, parent);
                    out.push(parent);
                    let low = (1u64 << per_unit.next_power_of_two().trailing_zeros()) - 1;
                    let name = parent & !low;
                    for offset in 1..per_unit.min(n - b) {
                        parent = name | offset as u64;
                        out.push(parent);
                    }
                    b += per_unit;
                }
            }
            _ => {
                for b in 0..n {
                    parent = self.block_hash(b, block_size, parent);
                    out.push(parent);
                }
            }
        }
        out
    }

    /// The engine's chained hash of full block `b` (`block_size` tokens) after `parent`.
    /// Explicit prompts hash their tokens; synthetic ones hash what determines the tokens
    /// (content id and offset), which names the same content without generating it.
    pub(crate) fn block_hash(&self, b: usize, block_size: usize, parent: u64) -> u64 {
        match self {
            Self::Explicit(t) => {
                let mut bytes = Vec::with_capacity(block_size * 4);
                for tok in &t[b * block_size..(b + 1) * block_size] {
                    bytes.extend_from_slice(&tok.to_le_bytes());
                }
                xxh3_64_with_seed(&bytes, parent)
            }
            Self::Synthetic { ids, unit, .. } => {
                let start = b * block_size;
                if unit % block_size == 0 {
                    // Units split into whole blocks: a unit is named by a multiply-fold of
                    // (parent, content id) in the high bits, and its blocks by their index in
                    // the low bits. The name is cheap (a million 15k-token prompts need 10^9
                    // of them), and a unit's blocks get neighbouring slots in the block
                    // table, so caching or evicting them touches a few cache lines rather
                    // than one per block.
                    let index_bits = (unit / block_size).next_power_of_two().trailing_zeros();
                    let low = (1u64 << index_bits) - 1;
                    let offset = ((start % unit) / block_size) as u64;
                    let unit_name = if offset == 0 {
                        let id = ids.get(start / unit).copied().unwrap_or(u64::MAX);
                        let x = parent ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let m = u128::from(x) * u128::from(0xff51_afd7_ed55_8ccd_u64);
                        (m as u64) ^ ((m >> 64) as u64)
                    } else {
                        // The parent is the previous block of the same unit.
                        parent
                    };
                    (unit_name & !low) | offset
                } else {
                    // Blocks straddle units: named by their tokens.
                    let bytes: Vec<u8> = (start..start + block_size)
                        .flat_map(|i| self.token(i).to_le_bytes())
                        .collect();
                    xxh3_64_with_seed(&bytes, parent)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The batch of hashes is the chain of single hashes, for synthetic prompts whose
        /// units split into blocks (the fast path), whose units do not, and explicit ones.
        #[test]
        fn block_hashes_chain_block_hash(
            ids in prop::collection::vec(any::<u64>(), 1..6),
            unit_blocks in 1usize..5,
            bs in prop::sample::select(vec![1usize, 2, 4, 16]),
            cut in 0usize..64,
            straddle in any::<bool>(),
        ) {
            let unit = if straddle { unit_blocks * bs + 1 } else { unit_blocks * bs };
            let len = (ids.len() * unit).saturating_sub(cut % unit.max(1));
            let synthetic = PromptTokens::Synthetic { ids: Arc::from(ids), unit, len };
            let explicit = PromptTokens::Explicit(Arc::from(synthetic.tokens(0, len)));
            for p in [&synthetic, &explicit] {
                let mut parent = 7;
                let one_by_one: Vec<u64> = (0..p.len() / bs)
                    .map(|b| {
                        parent = p.block_hash(b, bs, parent);
                        parent
                    })
                    .collect();
                prop_assert_eq!(p.block_hashes(bs, 7), one_by_one);
            }
        }
    }
}
