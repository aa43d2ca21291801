use kvroute_index::Tier;

/// Where the engine keeps a block (vLLM's `medium`: `"GPU"` from the block pool, other
/// values from offloading connectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Medium {
    /// Not given (older vLLM releases): the block pool's, GPU.
    Unspecified,
    /// A named medium, as sent.
    Named(String),
}

impl Medium {
    /// The index tier the medium maps to: `GPU` (and unspecified) → GPU, `CPU` and
    /// `lmcache-l1` (LMCache's host-memory tier) → CPU, any other named store (disk, a
    /// filesystem, remote, …) → disk, the slowest tier. The names are those upstream's
    /// `kvCacheBackendConfigs` weighs by default.
    pub fn tier(&self) -> Tier {
        match self {
            Self::Unspecified => Tier::Gpu,
            Self::Named(m) if m.eq_ignore_ascii_case("gpu") => Tier::Gpu,
            Self::Named(m)
                if m.eq_ignore_ascii_case("cpu") || m.eq_ignore_ascii_case("lmcache-l1") =>
            {
                Tier::Cpu
            }
            Self::Named(_) => Tier::Disk,
        }
    }
}

/// vLLM's `BlockStored`: full blocks newly cached, in chain order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStored {
    /// The engine's hashes of the blocks (byte-string hashes folded to 64 bits).
    pub block_hashes: Vec<u64>,
    /// The engine hash of the block before the first; `None` at the root of a chain.
    pub parent_block_hash: Option<u64>,
    /// The blocks' token ids, `block_size` per block.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: usize,
    /// The LoRA adapter the blocks were computed under.
    pub lora_name: Option<String>,
    /// Where the blocks are kept.
    pub medium: Medium,
    /// What the first block's extra hash keys (vLLM's `extra_keys[0]`) add besides the LoRA
    /// name; it matters only at a chain's root, where vLLM puts the `cache_salt`.
    pub first_extra: FirstExtra,
}

/// The first block's extra hash keys, as far as kvroute can name them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FirstExtra {
    /// None (or not sent: older vLLM releases).
    #[default]
    None,
    /// The request's `cache_salt`.
    Salt(String),
    /// Keys kvroute does not reproduce (multimodal inputs, prompt embeddings): no request
    /// kvroute hashes can match these blocks.
    Unknown,
}

/// One KV-cache event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks cached.
    BlockStored(BlockStored),
    /// Blocks evicted from `medium`.
    BlockRemoved {
        /// The engine's hashes of the blocks.
        block_hashes: Vec<u64>,
        /// Where they were evicted from.
        medium: Medium,
    },
    /// The whole prefix cache was reset.
    AllBlocksCleared,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The media upstream's default `kvCacheBackendConfigs` names land on the tiers its
    /// weights are read into; any other store is the slowest tier.
    #[test]
    fn media_map_to_tiers_case_blind() {
        let tier = |m: &str| Medium::Named(m.into()).tier();
        assert_eq!(Medium::Unspecified.tier(), Tier::Gpu);
        assert_eq!(tier("GPU"), Tier::Gpu);
        assert_eq!(tier("gpu"), Tier::Gpu);
        assert_eq!(tier("CPU"), Tier::Cpu);
        assert_eq!(tier("lmcache-l1"), Tier::Cpu);
        assert_eq!(tier("LMCACHE-L1"), Tier::Cpu);
        for other in ["disk", "fs", "lmcache-l2", ""] {
            assert_eq!(tier(other), Tier::Disk, "{other:?}");
        }
    }
}
