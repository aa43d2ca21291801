//! The per-request cycle state: typed slots that producers write and other plugins read.
//!
//! A cycle state is reused from request to request (the scheduler keeps a pool), so every
//! slot is a buffer that is cleared, never dropped: a warm cycle allocates nothing.

use std::sync::Arc;

use kvroute_core::{BYTES_PER_TOKEN, BlockHash, EndpointId, Prompt};
use kvroute_endpoints::EndpointState;
use kvroute_index::{EndpointMatch, MatchScratch};

use crate::{SchedulingRequest, endpoint_index};

/// Names one prefix producer's slot in the cycle state; resolved from the producer's plugin
/// name when the configuration is built.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SlotId(pub(crate) usize);

/// What one prefix producer found out about the prompt: its blocks as that producer's index
/// names them, and how much of them each endpoint holds.
#[derive(Debug, Default)]
pub struct PrefixInfo {
    filled: bool,
    /// The prompt's block hashes.
    pub blocks: Vec<BlockHash>,
    /// What the index holds of them, per endpoint holding at least the first.
    pub matches: Vec<EndpointMatch>,
    /// The prompt's length in tokens: exact when `exact`, else estimated from its text.
    pub prompt_tokens: u64,
    /// Whether `prompt_tokens` and `cached_tokens` count real tokens.
    pub exact: bool,
    /// Per endpoint of the cycle (by position): the share of the prompt's blocks it holds as
    /// a prefix, weighted by tier, in [0, 1].
    pub held: Vec<f64>,
    /// Per endpoint of the cycle: prompt tokens it holds cached.
    pub cached_tokens: Vec<u64>,
}

impl PrefixInfo {
    /// Clears the slot for a cycle over `endpoints` endpoints and marks it filled.
    pub fn start(&mut self, endpoints: usize) {
        self.filled = true;
        self.blocks.clear();
        self.matches.clear();
        self.prompt_tokens = 0;
        self.exact = false;
        self.held.clear();
        self.held.resize(endpoints, 0.0);
        self.cached_tokens.clear();
        self.cached_tokens.resize(endpoints, 0);
    }

    /// Whether the best any endpoint holds is nothing (or the slot is empty).
    pub fn no_hit(&self) -> bool {
        self.cached_tokens.iter().all(|&c| c == 0)
    }
}

/// What is known of the prompt's token ids.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum TokenState {
    /// Nobody tried.
    #[default]
    Unknown,
    /// `CycleState::tokens` holds them.
    Known,
    /// The prompt cannot be tokenized here (no tokenizer for the model, a template that
    /// refuses the messages, a batch).
    Unavailable,
}

/// One request's shared data, written by producers, read by every other plugin.
#[derive(Debug, Default)]
pub struct CycleState {
    prefix: Vec<PrefixInfo>,
    tokens: Vec<u32>,
    token_state: TokenState,
    pub(crate) scratch: Scratch,
}

/// Working memory producers reuse between cycles.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub(crate) matching: MatchScratch,
    pub(crate) bytes: Vec<u8>,
    pub(crate) positions: Positions,
}

/// Each endpoint's position among the cycle's endpoints, keyed by the address of its id's
/// name. An index names the endpoints it matched by clones of the ids they were recorded
/// under, mostly the registry's own, so their positions are found without comparing names:
/// a search by name compared about six names per match, a quarter of a precise decision at
/// 64 endpoints. An id that is not such a clone is found by name.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    /// Open addressing, a power of two at least twice the endpoints: `(address, position)`,
    /// address 0 empty.
    table: Vec<(usize, u32)>,
    /// The endpoint slice the table was built for, `(address, length)`; `(0, 0)` for none.
    built_for: (usize, usize),
}

impl Positions {
    /// Forgets the table: the next cycle's endpoints may differ.
    fn reset(&mut self) {
        self.built_for = (0, 0);
    }

    /// Builds the table for `endpoints` unless it is already theirs.
    pub(crate) fn build(&mut self, endpoints: &[Arc<EndpointState>]) {
        let key = (endpoints.as_ptr() as usize, endpoints.len());
        if self.built_for == key {
            return;
        }
        let size = (endpoints.len() * 2).next_power_of_two().max(2);
        self.table.clear();
        self.table.resize(size, (0, 0));
        for (pos, e) in endpoints.iter().enumerate() {
            let addr = e.id().addr();
            let mut i = Self::home(addr, size);
            while self.table[i].0 != 0 {
                i = (i + 1) & (size - 1);
            }
            self.table[i] = (addr, pos as u32);
        }
        self.built_for = key;
    }

    /// The position of `id` among `endpoints` (which the table must have been built for).
    pub(crate) fn find(&self, endpoints: &[Arc<EndpointState>], id: &EndpointId) -> Option<usize> {
        let size = self.table.len();
        if size > 0 && self.built_for == (endpoints.as_ptr() as usize, endpoints.len()) {
            let addr = id.addr();
            let mut i = Self::home(addr, size);
            while self.table[i].0 != 0 {
                if self.table[i].0 == addr {
                    let pos = self.table[i].1 as usize;
                    if endpoints[pos].id().is(id) {
                        return Some(pos);
                    }
                    break;
                }
                i = (i + 1) & (size - 1);
            }
        }
        endpoint_index(endpoints, id)
    }

    /// Where `addr` starts probing: allocations are aligned, so the low bits say nothing.
    fn home(addr: usize, size: usize) -> usize {
        ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as usize)
            >> (usize::BITS - size.trailing_zeros()))
            & (size - 1)
    }
}

impl CycleState {
    /// A state with `slots` prefix slots.
    pub fn new(slots: usize) -> Self {
        let mut s = Self::default();
        s.reset(slots);
        s
    }

    /// Empties every slot for the next request (keeping their buffers).
    pub fn reset(&mut self, slots: usize) {
        self.prefix.resize_with(slots, PrefixInfo::default);
        self.prefix.truncate(slots);
        for p in &mut self.prefix {
            p.filled = false;
        }
        self.tokens.clear();
        self.token_state = TokenState::Unknown;
        self.scratch.positions.reset();
    }

    /// What producer `slot` found, if it ran for this request.
    pub fn prefix(&self, slot: SlotId) -> Option<&PrefixInfo> {
        self.prefix.get(slot.0).filter(|p| p.filled)
    }

    /// The slot of producer `slot`, for it to fill (call [`PrefixInfo::start`] first).
    pub fn prefix_mut(&mut self, slot: SlotId) -> &mut PrefixInfo {
        if self.prefix.len() <= slot.0 {
            self.prefix.resize_with(slot.0 + 1, PrefixInfo::default);
        }
        &mut self.prefix[slot.0]
    }

    /// Slot `slot` and the scratch memory, borrowed together.
    pub(crate) fn prefix_and_scratch(&mut self, slot: SlotId) -> (&mut PrefixInfo, &mut Scratch) {
        self.prefix_mut(slot);
        (&mut self.prefix[slot.0], &mut self.scratch)
    }

    /// The token ids (if known), slot `slot` and the scratch memory, borrowed together.
    pub(crate) fn tokens_prefix_and_scratch(
        &mut self,
        slot: SlotId,
    ) -> (Option<&[u32]>, &mut PrefixInfo, &mut Scratch) {
        self.prefix_mut(slot);
        let tokens = (self.token_state == TokenState::Known).then_some(self.tokens.as_slice());
        (tokens, &mut self.prefix[slot.0], &mut self.scratch)
    }

    /// Every filled prefix slot.
    pub fn prefixes(&self) -> impl Iterator<Item = &PrefixInfo> {
        self.prefix.iter().filter(|p| p.filled)
    }

    /// The prompt's token ids, if a producer tokenized it.
    pub fn tokens(&self) -> Option<&[u32]> {
        (self.token_state == TokenState::Known).then_some(self.tokens.as_slice())
    }

    /// Whether tokenizing was tried, and how it went.
    pub fn token_state(&self) -> TokenState {
        self.token_state
    }

    /// Records the prompt's token ids.
    pub fn set_tokens(&mut self, tokens: &[u32]) {
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
        self.token_state = TokenState::Known;
    }

    /// Records that the prompt cannot be tokenized.
    pub fn set_tokens_unavailable(&mut self) {
        self.tokens.clear();
        self.token_state = TokenState::Unavailable;
    }

    /// The prompt's length in tokens: exact where a producer counted them, else estimated
    /// from its text. `None` without a body.
    pub fn prompt_tokens(&self, request: &SchedulingRequest<'_>) -> Option<u64> {
        let req = request.request?;
        if let Some(tokens) = self.tokens() {
            return Some(tokens.len() as u64);
        }
        if let Some(p) = self.prefixes().find(|p| p.exact) {
            return Some(p.prompt_tokens);
        }
        Some(estimate_tokens(&req.prompt))
    }

    /// Prompt tokens endpoint `pos` holds cached, by the best of the given slots (all filled
    /// slots when `slots` is empty), at most `prompt - 1`: the last prompt token is always
    /// computed (vLLM never serves a whole prompt from cache).
    pub fn cached_tokens(&self, slots: &[SlotId], pos: usize, prompt: u64) -> u64 {
        let best = if slots.is_empty() {
            self.prefixes()
                .filter_map(|p| p.cached_tokens.get(pos))
                .copied()
                .max()
        } else {
            slots
                .iter()
                .filter_map(|&s| self.prefix(s)?.cached_tokens.get(pos))
                .copied()
                .max()
        };
        best.unwrap_or(0).min(prompt.saturating_sub(1))
    }
}

/// The endpoints a plugin looks at in one step of a cycle: those left by the filters so far,
/// each with its position in the cycle's endpoint list (which is what per-endpoint slots are
/// indexed by).
#[derive(Clone, Copy, Debug)]
pub struct Candidates<'a> {
    endpoints: &'a [Arc<EndpointState>],
    kept: &'a [usize],
}

impl<'a> Candidates<'a> {
    pub(crate) fn new(endpoints: &'a [Arc<EndpointState>], kept: &'a [usize]) -> Self {
        Self { endpoints, kept }
    }

    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Each candidate with its position in the cycle's endpoint list, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (usize, &'a Arc<EndpointState>)> + 'a {
        let endpoints = self.endpoints;
        self.kept.iter().map(move |&p| (p, &endpoints[p]))
    }

    /// The `i`-th candidate.
    pub fn get(&self, i: usize) -> &'a Arc<EndpointState> {
        &self.endpoints[self.kept[i]]
    }

    /// The `i`-th candidate's position in the cycle's endpoint list.
    pub fn position(&self, i: usize) -> usize {
        self.kept[i]
    }
}

/// Tokens in a prompt kvroute has not tokenized, estimated from its text (exact for token
/// ids).
pub(crate) fn estimate_tokens(prompt: &Prompt) -> u64 {
    (prompt.index_bytes() / BYTES_PER_TOKEN) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions are found by a clone of an endpoint's own id without comparing names, and
    /// by name for an equal id allocated apart; a name not there has none, and a table
    /// built for other endpoints is never trusted.
    #[test]
    fn positions_are_found_by_shared_id_and_else_by_name() {
        let eps = crate::test_util::registry(40).snapshot();
        let mut p = Positions::default();
        p.build(&eps);
        for (i, e) in eps.iter().enumerate() {
            assert_eq!(p.find(&eps, &e.id().clone()), Some(i));
            let apart = EndpointId::new(e.id().as_str().to_owned());
            assert!(!apart.is(e.id()));
            assert_eq!(p.find(&eps, &apart), Some(i));
        }
        assert_eq!(p.find(&eps, &EndpointId::new("nowhere")), None);
        // Another slice: its positions, not the table's.
        let fewer = &eps[5..];
        assert_eq!(p.find(fewer, eps[7].id()), Some(2));
        assert_eq!(p.find(fewer, eps[0].id()), None);
        p.build(fewer);
        assert_eq!(p.find(fewer, eps[7].id()), Some(2));
        // A new cycle forgets the table.
        let mut state = CycleState::new(1);
        state.scratch.positions.build(&eps);
        state.reset(1);
        assert_eq!(state.scratch.positions.built_for, (0, 0));
    }

    #[test]
    fn text_prompts_are_estimated_from_their_length() {
        assert_eq!(estimate_tokens(&Prompt::Text("x".repeat(400))), 100);
        assert_eq!(estimate_tokens(&Prompt::Tokens(vec![1, 2, 3])), 3);
    }

    #[test]
    fn a_reset_state_reports_no_slot_and_keeps_its_buffers() {
        let mut s = CycleState::new(2);
        let p = s.prefix_mut(SlotId(1));
        p.start(3);
        p.cached_tokens[2] = 40;
        assert_eq!(s.cached_tokens(&[], 2, 100), 40);
        assert_eq!(s.cached_tokens(&[SlotId(0)], 2, 100), 0, "slot 0 never ran");
        assert_eq!(
            s.cached_tokens(&[SlotId(1)], 2, 30),
            29,
            "capped at prompt - 1"
        );
        s.reset(2);
        assert!(s.prefix(SlotId(1)).is_none());
        assert!(s.prefix_mut(SlotId(1)).cached_tokens.capacity() >= 3);
    }
}
