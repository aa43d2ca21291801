//! kvroute's predicted-TTFT scorer.

use crate::{BodyUse, Candidates, CycleState, Plugin, SchedulingRequest, Scorer, SlotId};

/// Prefers the endpoint where this request would get its first token soonest
/// (`ttft-scorer`, kvroute's own): the prefill queued there (tokens routed and not yet
/// answered, `EndpointState::prefill_backlog`) plus the part of this prompt it does not hold
/// cached, by the best of the prefix producers it reads (all of them unless its `producers`
/// parameter names some). Prefill dominates time to first token and both terms are in prompt
/// tokens, so their sum ranks endpoints by predicted TTFT. The uncached part counts
/// `1 + work_weight` times: beyond this request's own wait, it is prefill work every request
/// queued after it there waits for, which a prompt sent where its prefix is (or is being)
/// cached does not add. Scores are `best / predicted`, in (0, 1].
#[derive(Debug)]
pub(crate) struct TtftScorer {
    reads: Vec<SlotId>,
    work_weight: f64,
}

impl TtftScorer {
    /// A scorer reading the prefix slots `reads` (empty: every slot filled), counting the
    /// work a request adds `1 + work_weight` times.
    pub(crate) fn new(reads: Vec<SlotId>, work_weight: f64) -> Self {
        Self { reads, work_weight }
    }
}

impl Plugin for TtftScorer {
    fn type_name(&self) -> &'static str {
        "ttft-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }

    fn reads(&self) -> &[SlotId] {
        &self.reads
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Parsed
    }
}

impl Scorer for TtftScorer {
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some(prompt) = state.prompt_tokens(request) else {
            return;
        };
        // Plus one: an idle endpoint holding all but nothing still costs something, and no
        // prediction is zero.
        let predicted = |pos: usize, backlog: u64| {
            let uncached = prompt - state.cached_tokens(&self.reads, pos, prompt);
            backlog as f64 + (1.0 + self.work_weight) * uncached as f64 + 1.0
        };
        let mut best = f64::INFINITY;
        for (s, (pos, ep)) in scores.iter_mut().zip(candidates.iter()) {
            *s = predicted(pos, ep.prefill_backlog());
            best = best.min(*s);
        }
        for s in scores.iter_mut() {
            *s = best / *s;
        }
    }
}
