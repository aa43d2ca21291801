//! kvroute's predicted-TTFT scorer.

use crate::{BodyUse, Candidates, CycleState, Plugin, SchedulingRequest, Scorer, SlotId};

/// Prefers the endpoint where this request would get its first token soonest
/// (`ttft-scorer`, kvroute's own): the prefill queued there (tokens routed and not yet
/// answered, `EndpointState::prefill_backlog`) plus the part of this prompt it does not hold
/// cached, by the best of the prefix producers it reads (all of them unless its `producers`
/// parameter names some). Prefill dominates time to first token, so this ranks endpoints by
/// predicted TTFT. With `learnSpeed` (the default), an endpoint that has turned
/// queued prompt tokens into first tokens more than 1.5x slower than the fastest
/// (`EndpointState::prefill_us_per_token`, learnt from the first answer bytes of the
/// requests routed there) counts its tokens at that ratio. The uncached part counts
/// `1 + work_weight` times: beyond this request's own wait, it is prefill work every request
/// queued after it there waits for, which a prompt sent where its prefix is (or is being)
/// cached does not add. Scores are `best / predicted`, in (0, 1].
#[derive(Debug)]
pub(crate) struct TtftScorer {
    reads: Vec<SlotId>,
    work_weight: f64,
    learn_speed: bool,
}

/// How much slower than the fastest endpoint one must have shown itself before its queue
/// counts at its own speed (`learnSpeed`).
const SLOWER: f64 = 1.5;

impl TtftScorer {
    /// A scorer reading the prefix slots `reads` (empty: every slot filled), counting the
    /// work a request adds `1 + work_weight` times, and with `learn_speed` each endpoint's
    /// tokens at its learnt speed.
    pub(crate) fn new(reads: Vec<SlotId>, work_weight: f64, learn_speed: bool) -> Self {
        Self {
            reads,
            work_weight,
            learn_speed,
        }
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
        let tokens = |pos: usize, backlog: u64| {
            let uncached = prompt - state.cached_tokens(&self.reads, pos, prompt);
            backlog as f64 + (1.0 + self.work_weight) * uncached as f64 + 1.0
        };
        // With `learnSpeed`, an endpoint that has shown itself more than `SLOWER` times
        // slower than the fastest counts its tokens at that ratio; closer speeds are
        // measurement noise (a pod's load changes its speed too) and count alike.
        let fastest = if self.learn_speed {
            candidates
                .iter()
                .filter_map(|(_, ep)| ep.prefill_us_per_token())
                .fold(f64::INFINITY, f64::min)
        } else {
            f64::INFINITY
        };
        let mut best = f64::INFINITY;
        for (s, (pos, ep)) in scores.iter_mut().zip(candidates.iter()) {
            let slower = match ep.prefill_us_per_token() {
                Some(v) if fastest.is_finite() => v / fastest,
                _ => 1.0,
            };
            let factor = if slower > SLOWER { slower } else { 1.0 };
            *s = factor * tokens(pos, ep.prefill_backlog());
            best = best.min(*s);
        }
        for s in scores.iter_mut() {
            *s = best / *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kvroute_core::{Prompt, RequestHints};

    use crate::test_util::{registry, request};
    use crate::{BuildContext, EndpointPickerConfig, SchedulingRequest};

    /// With `learnSpeed` (the default), queues are weighed at the speed each endpoint
    /// showed: a pod that has been 4x slower loses to a faster one with twice its queue,
    /// which it beats while nothing is learnt, or with `learnSpeed: false`.
    #[test]
    fn a_queue_counts_at_the_speed_learnt_there() {
        let reg = registry(2);
        let eps = reg.snapshot();
        let load = |yaml: &str| EndpointPickerConfig::load(yaml, &BuildContext::new(16)).unwrap();
        let s = load("plugins: [{type: ttft-scorer}]");
        let blind = load("plugins: [{type: ttft-scorer, parameters: {learnSpeed: false}}]");
        let hints = RequestHints::default();
        // About 1,000 tokens, cached nowhere.
        let req = request(Prompt::Text("routing ".repeat(500)));
        let pick_with = |s: &crate::Scheduler| {
            s.schedule(&SchedulingRequest::new(Some(&req), &hints), &eps)
                .unwrap()
                .primary()
                .address()
                .port()
        };
        let pick = || pick_with(&s);
        // Endpoint 1 has 2,000 tokens queued, endpoint 2 none: 2 is sooner.
        let queued = eps[0].acquire_with_prefill(2_000);
        assert_eq!(pick(), 2);
        // Four times, endpoint 1 turned 3,000 tokens (its queue and a request's 1,000) around
        // in 30 ms, endpoint 2 a lone 1,000 in 40 ms.
        let t0 = Instant::now();
        for (ep, ms) in [(&eps[0], 30), (&eps[1], 40)] {
            for _ in 0..4 {
                assert_eq!(pick(), 2, "nothing learnt before four samples");
                let mut g = ep.acquire_with_prefill_at(1_000, t0);
                g.prefilled_at(t0 + Duration::from_millis(ms));
            }
        }
        let learnt = |i: usize| eps[i].prefill_us_per_token().unwrap();
        assert!((learnt(0) - 10.0).abs() < 1e-9, "{}", learnt(0));
        assert!((learnt(1) - 40.0).abs() < 1e-9, "{}", learnt(1));
        // 10 µs × 3,001 tokens against 40 µs × 1,001: endpoint 1 is sooner now.
        assert_eq!(pick(), 1);
        assert_eq!(
            pick_with(&blind),
            2,
            "with learnSpeed: false tokens count alike"
        );
        drop(queued);
    }
}
