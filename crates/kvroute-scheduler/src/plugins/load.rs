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
        let load = |i: usize| candidates.get(i).in_flight();
        let (mut min, mut max) = (usize::MAX, 0);
        for i in 0..candidates.len() {
            min = min.min(load(i));
            max = max.max(load(i));
        }
        let spread = max.saturating_sub(min).max(self.headroom) as f64;
        for (i, s) in scores.iter_mut().enumerate() {
            *s = (max - load(i)) as f64 / spread;
        }
    }
}
