use kvroute_core::BlockHash;
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// What besides tokens makes two cache entries distinct (vLLM's "extra keys").
#[derive(Clone, Copy, Default, Debug)]
pub struct ExtraKeys<'a> {
    /// LoRA adapter serving the request; blocks computed under different adapters differ.
    pub lora: Option<&'a str>,
    /// Tenant isolation salt (`cache_salt`).
    pub cache_salt: Option<&'a str>,
}

/// Chained hashes of full token blocks.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    block_size: usize,
}

impl BlockHasher {
    /// Hashes blocks of `block_size` tokens (vLLM's default is 16). `block_size` 0 is taken as 1.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The hash every chain starts from: it covers the extra keys, so requests under another
    /// adapter or salt never share a block.
    pub fn root(extra: &ExtraKeys<'_>) -> BlockHash {
        // Streamed, so no key is built: the same bytes as one buffer would hash alike.
        let mut key = Xxh3::new();
        key.update(b"kvroute/blocks/1");
        for part in [extra.lora, extra.cache_salt] {
            match part {
                Some(s) => {
                    key.update(&[1]);
                    key.update(&(s.len() as u64).to_le_bytes());
                    key.update(s.as_bytes());
                }
                None => key.update(&[0]),
            }
        }
        BlockHash(key.digest())
    }

    /// The hash of one block of tokens whose parent block hashes to `parent`.
    pub fn chain(parent: BlockHash, tokens: &[u32], scratch: &mut Vec<u8>) -> BlockHash {
        scratch.clear();
        scratch.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        BlockHash(xxh3_64_with_seed(scratch, parent.0))
    }

    /// Appends the hashes of every full block of `tokens` to `out`; a trailing partial block
    /// is not hashed (model servers cache full blocks only).
    pub fn hash_tokens(&self, tokens: &[u32], extra: &ExtraKeys<'_>, out: &mut Vec<BlockHash>) {
        self.hash_tokens_with(tokens, extra, &mut Vec::new(), out);
    }

    /// [`Self::hash_tokens`] with the caller's `scratch` bytes, so that a warm caller
    /// allocates nothing.
    pub fn hash_tokens_with(
        &self,
        tokens: &[u32],
        extra: &ExtraKeys<'_>,
        scratch: &mut Vec<u8>,
        out: &mut Vec<BlockHash>,
    ) {
        let mut parent = Self::root(extra);
        out.reserve(tokens.len() / self.block_size);
        for block in tokens.chunks_exact(self.block_size) {
            parent = Self::chain(parent, block, scratch);
            out.push(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hashes(h: &BlockHasher, tokens: &[u32], extra: ExtraKeys<'_>) -> Vec<BlockHash> {
        let mut out = Vec::new();
        h.hash_tokens(tokens, &extra, &mut out);
        out
    }

    #[test]
    fn full_blocks_only() {
        let h = BlockHasher::new(4);
        assert_eq!(hashes(&h, &[1, 2, 3], ExtraKeys::default()).len(), 0);
        assert_eq!(
            hashes(&h, &(0..11).collect::<Vec<_>>(), ExtraKeys::default()).len(),
            2
        );
        assert_eq!(BlockHasher::new(0).block_size(), 1);
    }

    #[test]
    fn extra_keys_separate_chains() {
        let h = BlockHasher::new(2);
        let t = [1, 2, 3, 4];
        let plain = hashes(&h, &t, ExtraKeys::default());
        let salted = hashes(
            &h,
            &t,
            ExtraKeys {
                cache_salt: Some("a"),
                lora: None,
            },
        );
        let lora = hashes(
            &h,
            &t,
            ExtraKeys {
                lora: Some("a"),
                cache_salt: None,
            },
        );
        assert_ne!(plain, salted);
        assert_ne!(
            salted, lora,
            "the same string as salt or as adapter differs"
        );
        assert_ne!(plain[1], salted[1]);
    }

    #[test]
    fn a_block_covers_its_parents() {
        let h = BlockHasher::new(2);
        let a = hashes(&h, &[1, 2, 3, 4], ExtraKeys::default());
        let b = hashes(&h, &[9, 9, 3, 4], ExtraKeys::default());
        assert_ne!(a[1], b[1], "same second block, different first block");
    }

    proptest! {
        /// Prefixes of equal token sequences hash equally, block for block, and the chain
        /// computed block by block equals the batch computation.
        #[test]
        fn prefixes_share_hashes(common in proptest::collection::vec(any::<u32>(), 0..100),
                                 a in proptest::collection::vec(any::<u32>(), 0..40),
                                 b in proptest::collection::vec(any::<u32>(), 0..40),
                                 bs in 1usize..20) {
            let h = BlockHasher::new(bs);
            let ta: Vec<u32> = common.iter().chain(&a).copied().collect();
            let tb: Vec<u32> = common.iter().chain(&b).copied().collect();
            let ha = hashes(&h, &ta, ExtraKeys::default());
            let hb = hashes(&h, &tb, ExtraKeys::default());
            let shared = common.len() / bs;
            prop_assert_eq!(&ha[..shared], &hb[..shared]);
            let mut parent = BlockHasher::root(&ExtraKeys::default());
            let mut scratch = Vec::new();
            for (i, block) in ta.chunks_exact(bs).enumerate() {
                parent = BlockHasher::chain(parent, block, &mut scratch);
                prop_assert_eq!(parent, ha[i]);
            }
        }
    }
}
