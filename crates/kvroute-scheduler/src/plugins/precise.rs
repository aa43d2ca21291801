//! The precise prefix-cache producer: what each endpoint's KV cache really holds, from the
//! index its KV events keep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvroute_core::{BlockHash, EndpointId, Prompt};
use kvroute_endpoints::EndpointState;
use kvroute_index::{ApproxIndex, EndpointMatch, MatchScratch, PrefixIndex, Shared};
use kvroute_tokens::{BlockHasher, ExtraKeys, ModelTokenizer};

use crate::cycle::TokenState;
use crate::{BodyUse, CycleState, Decision, Plugin, Producer, SchedulingRequest, SlotId};

/// The tokenizers of the models served, by model name (as requests name them), and one for
/// any other name; and the LoRA adapters served, by name, with their base model.
#[derive(Debug, Default, Clone)]
pub struct Tokenizers {
    by_model: HashMap<String, Arc<ModelTokenizer>>,
    default: Option<Arc<ModelTokenizer>>,
    adapters: HashMap<String, String>,
}

impl Tokenizers {
    /// No tokenizers: only prompts sent as token ids are hashed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `model`'s tokenizer.
    pub fn insert(&mut self, model: impl Into<String>, tokenizer: Arc<ModelTokenizer>) {
        self.by_model.insert(model.into(), tokenizer);
    }

    /// The tokenizer for models not named otherwise.
    pub fn set_default(&mut self, tokenizer: Arc<ModelTokenizer>) {
        self.default = Some(tokenizer);
    }

    /// Declares `adapter` a LoRA adapter of `base`: requests naming it are tokenized as
    /// `base` and their blocks rooted at the adapter's name, as vLLM hashes them.
    pub fn insert_adapter(&mut self, adapter: impl Into<String>, base: impl Into<String>) {
        self.adapters.insert(adapter.into(), base.into());
    }

    /// `model`'s tokenizer.
    pub fn get(&self, model: &str) -> Option<&Arc<ModelTokenizer>> {
        let base = self.adapters.get(model).map_or(model, String::as_str);
        self.by_model.get(base).or(self.default.as_ref())
    }

    /// The LoRA adapter a request for `model` runs under, if `model` names one.
    pub fn lora<'m>(&self, model: &'m str) -> Option<&'m str> {
        self.adapters.contains_key(model).then_some(model)
    }

    /// Whether there is no tokenizer at all.
    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty() && self.default.is_none()
    }
}

/// Fills the cycle's token ids, once per request: as sent, or tokenized with the model's
/// tokenizer (a prompt that cannot be is marked so).
fn tokenize(tokenizers: &Tokenizers, request: &SchedulingRequest<'_>, state: &mut CycleState) {
    let Some(req) = request.request else { return };
    if state.token_state() != TokenState::Unknown {
        return;
    }
    match &req.prompt {
        Prompt::Tokens(tokens) => state.set_tokens(tokens),
        prompt => match tokenizers
            .get(&req.model)
            .map(|t| t.encode_prompt(prompt, &req.chat))
        {
            Some(Ok(tokens)) => state.set_tokens(&tokens),
            _ => state.set_tokens_unavailable(),
        },
    }
}

/// Tokenizes the prompt for the plugins that read token ids (`token-producer`), with the
/// tokenizers kvroute loaded (`--tokenizers-dir`); upstream's alternative of asking a pod's
/// render endpoint gives the same ids without the round trip.
#[derive(Debug)]
pub(crate) struct TokenProducer {
    tokenizers: Tokenizers,
}

impl TokenProducer {
    pub(crate) fn new(tokenizers: Tokenizers) -> Self {
        Self { tokenizers }
    }
}

impl Plugin for TokenProducer {
    fn type_name(&self) -> &'static str {
        "token-producer"
    }

    fn producer(&self) -> Option<&dyn Producer> {
        Some(self)
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Tokenized
    }
}

impl Producer for TokenProducer {
    fn produce(
        &self,
        request: &SchedulingRequest<'_>,
        _: &[Arc<EndpointState>],
        state: &mut CycleState,
    ) {
        tokenize(&self.tokenizers, request, state);
    }
}

/// Matches the prompt's token blocks against the index the pods' KV events keep
/// (`precise-prefix-cache-producer`): held blocks weighted by tier, over the prompt's blocks.
/// Prompts it cannot tokenize (no tokenizer for the model, a template that refuses the
/// messages, a batch) leave the slot empty, and endpoints whose event stream is not confirmed
/// in sequence (`EndpointState::events_confirmed`) hold nothing in it, so a profile's other
/// plugins (the approximate producer) decide for them.
#[derive(Debug)]
pub(crate) struct PreciseProducer {
    slot: SlotId,
    index: Arc<Shared<PrefixIndex>>,
    hasher: BlockHasher,
    weights: [f64; 3],
    tokenizers: Tokenizers,
    speculative: Option<Speculative>,
}

/// Most blocks the speculative entries keep per endpoint (a million tokens at 16 a block,
/// routed to one pod within the TTL): the least recently routed go first.
const SPECULATIVE_BLOCKS: usize = 1 << 16;

/// Upstream's `speculativeIndexing`: the prompts routed in the last `ttl`, held as if
/// cached on the endpoint they went to, since its KV events report them only once they are
/// computed. A sibling of a prompt still in prefill then finds it where it is going.
///
/// The entries are an approximate index of their own with a TTL (`ApproxIndex`), so a
/// decision matches them in time of the prompt's length, however many prompts were routed
/// in the TTL: a list scanned entry by entry cost 290 µs a decision at a few thousand
/// requests a second (docs/benchmarks.md, "Decision time of the default profiles"). A
/// prompt is recorded from where its pod's events already report it (a conversation's new
/// turn: its new blocks only), and matched on from there.
#[derive(Debug)]
pub(crate) struct Speculative {
    ttl_ms: u64,
    /// Instants become milliseconds since this one.
    epoch: Instant,
    recent: Mutex<Recent>,
}

/// The entries and what matching them reuses, under one lock.
#[derive(Debug)]
struct Recent {
    index: ApproxIndex,
    scratch: MatchScratch,
    matches: Vec<EndpointMatch>,
    /// When every endpoint's expired entries were last dropped, ms.
    expired_ms: u64,
}

impl Speculative {
    pub(crate) fn new(ttl: Duration) -> Self {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            ttl_ms,
            epoch: Instant::now(),
            recent: Mutex::new(Recent {
                index: ApproxIndex::new(SPECULATIVE_BLOCKS, Some(ttl_ms)),
                scratch: MatchScratch::default(),
                matches: Vec::new(),
                expired_ms: 0,
            }),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn record(&self, endpoint: &EndpointId, blocks: &[BlockHash], now: Instant) {
        let now_ms = self.ms(now);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.index.record(endpoint, blocks, now_ms);
    }

    /// Calls `found(endpoint, n)` for each endpoint a prompt routed in the TTL went to that
    /// shares its first `n > 0` blocks with `blocks`: a prompt recorded whole matches from
    /// the first block, one recorded from where its endpoint's events stopped (`reported`,
    /// the precise index's matches, for the endpoints `confirmed`) matches on from there.
    /// Expired entries are dropped for every endpoint at most every sixteenth of the TTL
    /// (recording drops the recorded endpoint's at once), so one may answer up to that much
    /// past its TTL.
    fn matches(
        &self,
        blocks: &[BlockHash],
        reported: &[EndpointMatch],
        confirmed: impl Fn(&EndpointId) -> bool,
        now: Instant,
        mut found: impl FnMut(&EndpointId, usize),
    ) {
        let now_ms = self.ms(now);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let Recent {
            index,
            scratch,
            matches,
            expired_ms,
        } = &mut *recent;
        if now_ms.saturating_sub(*expired_ms) >= (self.ttl_ms / 16).max(1) || now_ms < *expired_ms {
            index.expire(now_ms);
            *expired_ms = now_ms;
        }
        index.match_prefix_into(blocks, scratch, matches);
        for m in matches.iter().filter(|m| m.blocks > 0) {
            found(&m.endpoint, m.blocks as usize);
        }
        // Most endpoints a precise match names hold nothing after it here, which `held_run`
        // answers from the block alone: the endpoint is looked up only for the others.
        for m in reported {
            let from = m.blocks as usize;
            let run = blocks
                .get(from..)
                .map_or(0, |rest| index.held_run(&m.endpoint, rest));
            if run > 0 && confirmed(&m.endpoint) {
                found(&m.endpoint, from + run);
            }
        }
    }

    fn forget(&self, departed: &[EndpointId]) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for endpoint in departed {
            recent.index.remove_endpoint(endpoint);
        }
    }
}

impl PreciseProducer {
    pub(crate) fn new(
        slot: SlotId,
        index: Arc<Shared<PrefixIndex>>,
        block_size: usize,
        weights: [f64; 3],
        tokenizers: Tokenizers,
        speculative: Option<Speculative>,
    ) -> Self {
        Self {
            slot,
            index,
            hasher: BlockHasher::new(block_size),
            weights,
            tokenizers,
            speculative,
        }
    }
}

impl Plugin for PreciseProducer {
    fn type_name(&self) -> &'static str {
        "precise-prefix-cache-producer"
    }

    fn producer(&self) -> Option<&dyn Producer> {
        Some(self)
    }

    fn writes(&self) -> Option<SlotId> {
        Some(self.slot)
    }

    fn decided(&self, request: &SchedulingRequest<'_>, state: &CycleState, decision: &Decision) {
        let Some(speculative) = &self.speculative else {
            return;
        };
        let Some(info) = state.prefix(self.slot).filter(|p| !p.blocks.is_empty()) else {
            return;
        };
        let now = request.now();
        let prefill = decision.prefill().map(|(e, _)| e);
        for holder in std::iter::once(decision.primary()).chain(prefill) {
            // What its events already report is matched there; only the rest is recorded,
            // to be matched on from where that match stops.
            let reported = if holder.events_confirmed() {
                info.matches
                    .iter()
                    .find(|m| &m.endpoint == holder.id())
                    .map_or(0, |m| m.blocks as usize)
            } else {
                0
            };
            if let Some(rest) = info.blocks.get(reported..).filter(|r| !r.is_empty()) {
                speculative.record(holder.id(), rest, now);
            }
        }
    }

    fn endpoints_changed(&self, _: &[Arc<EndpointState>], departed: &[EndpointId]) {
        if let Some(speculative) = &self.speculative
            && !departed.is_empty()
        {
            speculative.forget(departed);
        }
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Tokenized
    }
}

impl Producer for PreciseProducer {
    fn produce(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        state: &mut CycleState,
    ) {
        let Some(req) = request.request else { return };
        tokenize(&self.tokenizers, request, state);
        let (Some(tokens), info, scratch) = state.tokens_prefix_and_scratch(self.slot) else {
            return;
        };
        info.start(endpoints.len());
        info.exact = true;
        info.prompt_tokens = tokens.len() as u64;
        let extra = ExtraKeys {
            lora: self.tokenizers.lora(&req.model),
            cache_salt: req.cache_salt.as_deref(),
        };
        self.hasher
            .hash_tokens_with(tokens, &extra, &mut scratch.bytes, &mut info.blocks);
        if info.blocks.is_empty() {
            return;
        }
        self.index
            .read()
            .match_prefix_into(&info.blocks, &mut scratch.matching, &mut info.matches);
        let total = info.blocks.len() as f64;
        let block = self.hasher.block_size() as u64;
        scratch.positions.build(endpoints);
        let positions = &scratch.positions;
        for m in &info.matches {
            if let Some(pos) = positions.find(endpoints, &m.endpoint)
                && endpoints[pos].events_confirmed()
            {
                let held: f64 = m
                    .per_tier
                    .iter()
                    .zip(&self.weights)
                    .map(|(&n, w)| f64::from(n) * w)
                    .sum();
                info.held[pos] = held / total;
                info.cached_tokens[pos] = u64::from(m.blocks) * block;
            }
        }
        if let Some(speculative) = &self.speculative {
            // Routed here in the last `speculativeTTL`: held as if in GPU memory.
            let confirmed = |e: &EndpointId| {
                positions
                    .find(endpoints, e)
                    .is_some_and(|pos| endpoints[pos].events_confirmed())
            };
            speculative.matches(
                &info.blocks,
                &info.matches,
                confirmed,
                request.now(),
                |endpoint, n| {
                    if let Some(pos) = positions.find(endpoints, endpoint) {
                        info.held[pos] = info.held[pos].max(n as f64 * self.weights[0] / total);
                        info.cached_tokens[pos] = info.cached_tokens[pos].max(n as u64 * block);
                    }
                },
            );
        }
    }
}

#[cfg(test)]
mod tests;
