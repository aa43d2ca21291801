//! Scorers of what kvroute itself has routed: requests in flight, endpoints used for cold
//! requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvroute_core::EndpointId;
use kvroute_endpoints::EndpointState;

use crate::plugins::load::{min_max, read_in_flight};
use crate::{BodyUse, Candidates, CycleState, Decision, Plugin, SchedulingRequest, Scorer, SlotId};

/// Prefers endpoints with fewer requests in flight through this router
/// (`active-request-scorer`): an endpoint at or under `idle_threshold` scores 1, the others
/// `(max − n) / max · max_busy_score`.
#[derive(Debug)]
pub(crate) struct ActiveRequestScorer {
    idle_threshold: usize,
    max_busy_score: f64,
}

impl ActiveRequestScorer {
    pub(crate) fn new(idle_threshold: usize, max_busy_score: f64) -> Self {
        Self {
            idle_threshold,
            max_busy_score,
        }
    }
}

impl Plugin for ActiveRequestScorer {
    fn type_name(&self) -> &'static str {
        "active-request-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        read_in_flight(candidates, scores);
        let (_, max) = min_max(scores);
        let idle = self.idle_threshold as f64;
        for s in scores.iter_mut() {
            *s = if *s <= idle {
                1.0
            } else {
                (max - *s) / max * self.max_busy_score
            };
        }
    }
}

/// Spreads cold requests (those no endpoint holds any of, by the prefix slots it reads) over
/// the endpoints least recently given one (`no-hit-lru-scorer`), so that new prefixes seed
/// every cache instead of piling onto one; warm requests score 0.5 everywhere. Endpoints
/// never given a cold request score 1; the others by how long ago, from 1 down to 0 (the
/// order upstream's ranks give).
#[derive(Debug)]
pub(crate) struct NoHitLruScorer {
    reads: Vec<SlotId>,
    capacity: usize,
    state: Mutex<ColdUse>,
}

/// When each endpoint was last given a cold request, by a counter.
#[derive(Debug, Default)]
struct ColdUse {
    last: HashMap<EndpointId, u64>,
    clock: u64,
}

impl NoHitLruScorer {
    pub(crate) fn new(reads: Vec<SlotId>, capacity: usize) -> Self {
        Self {
            reads,
            capacity: capacity.max(1),
            state: Mutex::new(ColdUse::default()),
        }
    }

    fn cold(&self, state: &CycleState) -> bool {
        if self.reads.is_empty() {
            state.prefixes().all(|p| p.no_hit())
        } else {
            self.reads
                .iter()
                .all(|&s| state.prefix(s).is_none_or(|p| p.no_hit()))
        }
    }
}

impl Plugin for NoHitLruScorer {
    fn type_name(&self) -> &'static str {
        "no-hit-lru-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }

    fn reads(&self) -> &[SlotId] {
        &self.reads
    }

    fn decided(&self, request: &SchedulingRequest<'_>, state: &CycleState, decision: &Decision) {
        if request.request.is_none() || !self.cold(state) {
            return;
        }
        let mut used = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // As the approximate producer does: checked under the lock the pruning takes.
        if decision.primary().departed() {
            return;
        }
        used.clock += 1;
        let clock = used.clock;
        used.last.insert(decision.primary().id().clone(), clock);
        if used.last.len() > self.capacity {
            // Forget the endpoint used longest ago, as a bounded LRU does.
            if let Some(oldest) = used
                .last
                .iter()
                .min_by_key(|&(_, t)| *t)
                .map(|(id, _)| id.clone())
            {
                used.last.remove(&oldest);
            }
        }
    }

    fn endpoints_changed(&self, _: &[Arc<EndpointState>], departed: &[EndpointId]) {
        let mut used = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for id in departed {
            used.last.remove(id);
        }
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Parsed
    }
}

impl Scorer for NoHitLruScorer {
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        if request.request.is_none() || !self.cold(state) {
            scores.iter_mut().for_each(|s| *s = 0.5);
            return;
        }
        let used = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // NaN: never given a cold request.
        for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
            *s = used.last.get(ep.id()).map_or(f64::NAN, |&t| t as f64);
        }
        drop(used);
        let (lo, hi) = min_max(scores);
        for s in scores.iter_mut() {
            *s = if s.is_nan() {
                1.0
            } else if hi > lo {
                // The least recent of them just under the never-used ones, the most recent 0.
                0.9 * (hi - *s) / (hi - lo)
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::{Prompt, RequestHints};

    use super::*;
    use crate::test_util::{registry, request};

    #[test]
    fn active_requests_score_idle_endpoints_fully() {
        let eps = registry(3).snapshot();
        let _a = [
            eps[0].acquire(),
            eps[0].acquire(),
            eps[0].acquire(),
            eps[0].acquire(),
        ];
        let _b = eps[1].acquire();
        let hints = RequestHints::default();
        let kept = [0, 1, 2];
        let mut s = [0.0; 3];
        ActiveRequestScorer::new(0, 0.5).score(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &Candidates::new(&eps, &kept),
            &mut s,
        );
        assert_eq!(s, [0.0, 0.375, 1.0]);
    }

    #[test]
    fn cold_requests_go_round_the_endpoints_least_recently_used_first() {
        let eps = registry(3).snapshot();
        let scorer = NoHitLruScorer::new(Vec::new(), 8);
        let hints = RequestHints::default();
        let req = request(Prompt::Text("cold".into()));
        let sr = SchedulingRequest::new(Some(&req), &hints);
        let state = CycleState::new(0);
        let kept = [0, 1, 2];
        let mut order = Vec::new();
        for _ in 0..6 {
            let mut s = [0.0; 3];
            scorer.score(&sr, &state, &Candidates::new(&eps, &kept), &mut s);
            let best = (0..3)
                .max_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a)))
                .unwrap();
            order.push(best);
            scorer.decided(
                &sr,
                &state,
                &Decision::new(Arc::clone(&eps[best]), Vec::new(), 0),
            );
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        scorer.endpoints_changed(&eps[1..], &[eps[0].id().clone()]);
        assert!(!scorer.state.lock().unwrap().last.contains_key(eps[0].id()));
    }
}
