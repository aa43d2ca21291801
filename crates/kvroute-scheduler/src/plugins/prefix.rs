//! Prefix-cache producers (approximate, from routing decisions) and the scorer that reads
//! any prefix slot.

use std::sync::Arc;
use std::time::Instant;

use kvroute_core::{BYTES_PER_TOKEN, BlockHash, EndpointId};
use kvroute_endpoints::EndpointState;
use kvroute_index::{ApproxIndex, Shared, WRITE_BATCH_BLOCKS};
use kvroute_tokens::ApproxHasher;

use crate::cycle::estimate_tokens;
use crate::{
    BodyUse, Candidates, CycleState, Decision, Plugin, Producer, SchedulingRequest, Scorer, SlotId,
};

/// Guesses what each endpoint caches from where earlier prompts were sent
/// (`approx-prefix-cache-producer`): the prompt's text is cut into chunks, hashed as a chain,
/// and matched against the chunks recorded per endpoint; after a decision, the prompt's
/// chunks are recorded against the primary (LRU-bounded per endpoint, optional TTL).
#[derive(Debug)]
pub(crate) struct ApproxProducer {
    slot: SlotId,
    hasher: ApproxHasher,
    index: Arc<Shared<ApproxIndex>>,
    epoch: Instant,
    /// `autoTune`: an endpoint's capacity is what its pod reports it caches (else the
    /// configured capacity, read as tokens), in prompt bytes at its tokenizer's learnt rate
    /// (`EndpointState::index_bytes_of`), in chunks. Without it, the configured capacity in
    /// chunks.
    auto_tune: bool,
    /// The configured capacity (`lruCapacityPerServer` blocks of `blockSizeTokens`) in
    /// tokens.
    configured_tokens: u64,
}

impl ApproxProducer {
    pub(crate) fn new(
        slot: SlotId,
        chunk_bytes: usize,
        max_blocks: usize,
        index: Arc<Shared<ApproxIndex>>,
        capacity: usize,
        auto_tune: bool,
    ) -> Self {
        Self {
            slot,
            hasher: ApproxHasher::new(chunk_bytes, max_blocks),
            index,
            epoch: Instant::now(),
            auto_tune,
            configured_tokens: (capacity.saturating_mul(chunk_bytes) / BYTES_PER_TOKEN) as u64,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Remembers that `holder` now caches `blocks`.
    fn record(&self, holder: &EndpointState, blocks: &[BlockHash], now: u64) {
        let endpoint = holder.id();
        // The pod's own cache size when it reports one, in chunks of its tokenizer's text:
        // a guess bounded by a fixed count forgets what a large pod still holds, or keeps
        // what a small one lost, and so does one that takes a token for 4 bytes of text
        // when the pod's tokenizer makes 2.
        let capacity = self.auto_tune.then(|| {
            let tokens = holder
                .kv_capacity_tokens()
                .unwrap_or(self.configured_tokens);
            let chunks = holder.index_bytes_of(tokens) / self.hasher.chunk_bytes() as u64;
            usize::try_from(chunks).unwrap_or(usize::MAX)
        });
        // Short write holds keep readers' latency flat (docs/index.md, "Sharing"); the last
        // chunk goes first so the prompt's beginning ends up most recently used.
        for (i, chunk) in blocks.rchunks(WRITE_BATCH_BLOCKS).enumerate() {
            let mut index = self.index.write();
            // Checked under the lock `endpoints_changed` prunes under, and the registry
            // marks a state departed before it calls that: a decision that finishes after
            // its endpoint left records nothing that would outlive the pruning.
            if holder.departed() {
                return;
            }
            if let (0, Some(blocks)) = (i, capacity) {
                index.set_capacity(endpoint, blocks);
            }
            index.record(endpoint, chunk, now);
        }
    }
}

impl Plugin for ApproxProducer {
    fn type_name(&self) -> &'static str {
        "approx-prefix-cache-producer"
    }

    fn producer(&self) -> Option<&dyn Producer> {
        Some(self)
    }

    fn writes(&self) -> Option<SlotId> {
        Some(self.slot)
    }

    fn decided(&self, _: &SchedulingRequest<'_>, state: &CycleState, decision: &Decision) {
        let Some(info) = state.prefix(self.slot).filter(|p| !p.blocks.is_empty()) else {
            return;
        };
        let now = self.now_ms();
        // A disaggregated prompt ends up cached on both pods: computed on the prefill pod,
        // moved to the decode pod.
        let prefill = decision.prefill().map(|(e, _)| e);
        for holder in std::iter::once(decision.primary()).chain(prefill) {
            self.record(holder, &info.blocks, now);
        }
    }
    fn endpoints_changed(&self, _: &[Arc<EndpointState>], departed: &[EndpointId]) {
        if departed.is_empty() {
            return;
        }
        let mut index = self.index.write();
        for id in departed {
            index.remove_endpoint(id);
        }
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Parsed
    }
}

impl Producer for ApproxProducer {
    fn produce(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        state: &mut CycleState,
    ) {
        let Some(req) = request.request else { return };
        let (info, scratch) = state.prefix_and_scratch(self.slot);
        info.start(endpoints.len());
        info.prompt_tokens = estimate_tokens(&req.prompt);
        self.hasher.hash_prompt_with(
            &req.model,
            req.cache_salt.as_deref(),
            &req.prompt,
            &mut scratch.bytes,
            &mut info.blocks,
        );
        if info.blocks.is_empty() {
            return;
        }
        self.index
            .read()
            .match_prefix_into(&info.blocks, &mut scratch.matching, &mut info.matches);
        let total = info.blocks.len() as f64;
        let per_block = (self.hasher.chunk_bytes() / BYTES_PER_TOKEN).max(1) as u64;
        scratch.positions.build(endpoints);
        for m in &info.matches {
            if let Some(pos) = scratch.positions.find(endpoints, &m.endpoint) {
                info.held[pos] = f64::from(m.blocks) / total;
                info.cached_tokens[pos] = u64::from(m.blocks) * per_block;
            }
        }
    }
}

/// Scores each candidate by the share of the prompt's blocks it holds as a prefix, as one
/// prefix slot says (`prefix-cache-scorer` over the approximate producer,
/// `precise-prefix-cache-scorer` over the precise one). With its own producer it is both
/// (upstream's configs list the scorer alone); naming a producer instead shares that one's
/// work and index.
#[derive(Debug)]
pub(crate) struct PrefixScorer {
    type_name: &'static str,
    slot: [SlotId; 1],
    own: Option<Arc<dyn Plugin>>,
    /// Upstream's `matchLengthWeight`: the share of the score given to the match's absolute
    /// length, `min(1, cached tokens / scale)²`, rather than its share of the prompt.
    length_weight: f64,
    /// Upstream's `matchLengthScaleTokens`.
    length_scale: f64,
}

impl PrefixScorer {
    /// A scorer reading `slot`, which `own` fills if given.
    pub(crate) fn new(type_name: &'static str, slot: SlotId, own: Option<Arc<dyn Plugin>>) -> Self {
        Self {
            type_name,
            slot: [slot],
            own,
            length_weight: 0.0,
            length_scale: 8192.0,
        }
    }

    /// Gives `weight` of the score to the match's absolute length, in full at `scale`
    /// tokens.
    pub(crate) fn with_match_length(mut self, weight: f64, scale: f64) -> Self {
        self.length_weight = weight;
        self.length_scale = scale;
        self
    }
}

impl Plugin for PrefixScorer {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }

    fn producer(&self) -> Option<&dyn Producer> {
        self.own.as_ref().and_then(|p| p.producer())
    }

    fn writes(&self) -> Option<SlotId> {
        self.own.as_ref().and_then(|p| p.writes())
    }

    fn reads(&self) -> &[SlotId] {
        &self.slot
    }

    fn decided(&self, request: &SchedulingRequest<'_>, state: &CycleState, decision: &Decision) {
        if let Some(own) = &self.own {
            own.decided(request, state, decision);
        }
    }

    fn endpoints_changed(&self, current: &[Arc<EndpointState>], departed: &[EndpointId]) {
        if let Some(own) = &self.own {
            own.endpoints_changed(current, departed);
        }
    }

    fn body_use(&self) -> BodyUse {
        // A scorer with its own precise producer tokenizes.
        self.own
            .as_ref()
            .map_or(BodyUse::Parsed, |p| p.body_use().max(BodyUse::Parsed))
    }
}

impl Scorer for PrefixScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some(info) = state.prefix(self.slot[0]) else {
            return;
        };
        let w = self.length_weight;
        for (s, (pos, _)) in scores.iter_mut().zip(candidates.iter()) {
            let length = (info.cached_tokens[pos] as f64 / self.length_scale).min(1.0);
            *s = w * length * length + (1.0 - w) * info.held[pos];
        }
    }
}
