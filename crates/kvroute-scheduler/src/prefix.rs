use std::sync::Arc;
use std::time::Instant;

use kvroute_core::BlockHash;
use kvroute_endpoints::EndpointState;
use kvroute_index::{ApproxIndex, DEFAULT_LRU_CAPACITY, EndpointMatch, Shared, WRITE_BATCH_BLOCKS};
use kvroute_tokens::{ApproxHasher, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BLOCKS};

use crate::{Decision, SchedulingRequest, Scorer, candidate_index};

/// Settings of the approximate prefix-cache scorer; the defaults are the Gateway API
/// Inference Extension's (`blockSizeTokens` 16 at 4 bytes a token, `maxPrefixBlocksToMatch`
/// 256, `lruCapacityPerServer` 31,250, no TTL).
#[derive(Clone, Debug)]
pub struct PrefixCacheConfig {
    /// Bytes of prompt text per block.
    pub chunk_bytes: usize,
    /// Blocks hashed at most per prompt.
    pub max_blocks: usize,
    /// Blocks remembered per endpoint.
    pub capacity_per_endpoint: usize,
    /// Forget a block recorded longer ago than this (milliseconds).
    pub ttl_ms: Option<u64>,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_blocks: DEFAULT_MAX_BLOCKS,
            capacity_per_endpoint: DEFAULT_LRU_CAPACITY,
            ttl_ms: None,
        }
    }
}

/// Scores each endpoint by the share of the prompt's blocks it holds as a consecutive
/// prefix, according to where earlier requests were sent (`prefix-cache-scorer`); after a
/// decision, records the prompt's blocks against the primary.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    hasher: ApproxHasher,
    index: Arc<Shared<ApproxIndex>>,
    epoch: Instant,
}

impl PrefixCacheScorer {
    /// An empty index with `config`.
    pub fn new(config: &PrefixCacheConfig) -> Self {
        Self {
            hasher: ApproxHasher::new(config.chunk_bytes, config.max_blocks),
            index: Arc::new(Shared::new(ApproxIndex::new(
                config.capacity_per_endpoint,
                config.ttl_ms,
            ))),
            epoch: Instant::now(),
        }
    }

    /// The index (for sizes, for dropping endpoints that left, and for other scorers that
    /// read what it guesses).
    pub fn index(&self) -> &Arc<Shared<ApproxIndex>> {
        &self.index
    }

    /// Bytes of prompt text per block.
    pub fn chunk_bytes(&self) -> usize {
        self.hasher.chunk_bytes()
    }

    /// The prompt's approximate block hashes, computed once per request.
    pub(crate) fn blocks<'r>(&self, request: &'r SchedulingRequest<'_>) -> Option<&'r [BlockHash]> {
        let req = request.request?;
        Some(request.approx_blocks.get_or_init(|| {
            let mut out = Vec::new();
            self.hasher
                .hash_prompt(&req.model, req.cache_salt.as_deref(), &req.prompt, &mut out);
            out
        }))
    }

    /// What the index held of the prompt's blocks when the request was first scored
    /// (looked up once per request), with the prompt's block count.
    pub(crate) fn matches<'r>(
        &self,
        request: &'r SchedulingRequest<'_>,
    ) -> Option<(usize, &'r [EndpointMatch])> {
        let blocks = self.blocks(request).filter(|b| !b.is_empty())?;
        let matches = request
            .approx_matches
            .get_or_init(|| self.index.read().match_prefix(blocks));
        Some((blocks.len(), matches))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Scorer for PrefixCacheScorer {
    fn name(&self) -> &'static str {
        "prefix-cache-scorer"
    }

    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    ) {
        let Some((total, matches)) = self.matches(request) else {
            return;
        };
        for m in matches {
            if let Some(i) = candidate_index(candidates, &m.endpoint) {
                scores[i] = f64::from(m.blocks) / total as f64;
            }
        }
    }

    fn decided(&self, request: &SchedulingRequest<'_>, decision: &Decision) {
        let Some(blocks) = self.blocks(request).filter(|b| !b.is_empty()) else {
            return;
        };
        let endpoint = decision.primary().id();
        let now = self.now_ms();
        // Short write holds keep readers' latency flat (docs/index.md, "Sharing"); the last
        // chunk goes first so the prompt's beginning ends up most recently used.
        for chunk in blocks.rchunks(WRITE_BATCH_BLOCKS) {
            self.index.write().record(endpoint, chunk, now);
        }
    }
}

#[cfg(test)]
mod tests;
