//! Load scorers.

use crate::{Candidates, CycleState, Plugin, SchedulingRequest, Scorer};

/// Prefers endpoints with fewer requests in flight (`load-scorer`, kvroute's own):
/// `(max − n) / max(max − min, headroom)` over the candidates. Like the min–max queue
/// scorer, but a spread smaller than `headroom` requests only costs its share, so a
/// prefix-cache hit is not given up for one request of imbalance.
#[derive(Debug)]
pub(crate) struct LoadScorer {
    headroom: usize,
}

impl LoadScorer {
    /// In-flight spread (requests) that counts in full; at least 1.
    pub(crate) fn new(headroom: usize) -> Self {
        Self {
            headroom: headroom.max(1),
        }
    }
}

impl Plugin for LoadScorer {
    fn type_name(&self) -> &'static str {
        "load-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

impl Scorer for LoadScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let (min, max) = read_in_flight(candidates, scores);
        let spread = (max - min).max(self.headroom as f64);
        for s in scores.iter_mut() {
            *s = (max - *s) / spread;
        }
    }
}

/// Writes each candidate's in-flight count into `scores` and returns their least and most.
/// Each count is read once: others change while a request is scored, and the range must be
/// of the values scored.
pub(crate) fn read_in_flight(candidates: &Candidates<'_>, scores: &mut [f64]) -> (f64, f64) {
    for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
        *s = ep.in_flight() as f64;
    }
    scores.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &l| {
        (lo.min(l), hi.max(l))
    })
}

#[cfg(test)]
mod tests {
    use kvroute_core::RequestHints;

    use super::*;
    use crate::test_util::registry;

    #[test]
    fn a_spread_within_the_headroom_costs_its_share() {
        let eps = registry(3).snapshot();
        let _g = [eps[0].acquire(), eps[0].acquire()];
        let hints = RequestHints::default();
        let kept = [0, 1, 2];
        let score = |headroom| {
            let mut s = [0.0; 3];
            LoadScorer::new(headroom).score(
                &SchedulingRequest::new(None, &hints),
                &CycleState::new(0),
                &Candidates::new(&eps, &kept),
                &mut s,
            );
            s
        };
        assert_eq!(score(8), [0.0, 0.25, 0.25]);
        assert_eq!(score(1), [0.0, 1.0, 1.0]);
    }
}
