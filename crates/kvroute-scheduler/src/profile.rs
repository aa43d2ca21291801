use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvroute_endpoints::EndpointState;
use kvroute_index::{PrefixIndex, Shared};

use crate::{
    Decision, PrecisePrefixConfig, PrecisePrefixScorer, PrefixCacheConfig, PrefixCacheScorer,
    ScheduleError, Scheduler, SchedulingRequest, TtftScorer,
};

/// One opinion about where a request should go. Scores are in [0, 1], higher is better; a
/// profile clamps whatever a scorer returns into that range.
pub trait Scorer: Send + Sync + Debug + 'static {
    /// The plugin name, as an `EndpointPickerConfig` would write it.
    fn name(&self) -> &'static str;

    /// Writes one score per candidate into `scores` (same order as `candidates`; zeroed).
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    );

    /// Called once a decision is made, so a scorer can remember it (the approximate prefix
    /// scorer records the prompt's blocks against the primary).
    fn decided(&self, _request: &SchedulingRequest<'_>, _decision: &Decision) {}
}

/// A scorer shared with another plugin that reads its state (the TTFT scorer reads the
/// prefix scorers' indexes).
impl<S: Scorer> Scorer for Arc<S> {
    fn name(&self) -> &'static str {
        S::name(self)
    }

    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    ) {
        S::score(self, request, candidates, scores);
    }

    fn decided(&self, request: &SchedulingRequest<'_>, decision: &Decision) {
        S::decided(self, request, decision);
    }
}

/// A scheduling profile: weighted scorers summed per endpoint, then the highest total wins.
/// Ties go to a rotating start position, so equal endpoints take turns; the next best
/// totals become the fallbacks.
#[derive(Debug)]
pub struct Profile {
    scorers: Vec<(Box<dyn Scorer>, f64)>,
    fallbacks: usize,
    cursor: AtomicUsize,
}

impl Profile {
    /// Fewest requests in flight wins (a load scorer that counts every request of spread in
    /// full); equal endpoints take turns, so a quiet period does not send everything to the
    /// first one. Given the same calls and loads, the same choices.
    pub fn least_in_flight(fallbacks: usize) -> Self {
        Self::new(vec![(Box::new(LoadScorer::new(1)), 1.0)], fallbacks)
    }

    /// kvroute's default profile. Without KV events: approximate prefix 3, load 4 (an
    /// 8-request headroom). With a precise index (`precise`, kept by the pool's KV events):
    /// precise prefix 2, approximate prefix 2, predicted TTFT 4, load 2. The approximate
    /// index stands in for what the events have not reported yet (blocks of requests still
    /// queued or in prefill), which the precise index alone misses; the TTFT scorer weighs
    /// each endpoint's queued prefill against what it holds of this prompt. Weights chosen
    /// with `kvroute bench` (`docs/benchmarks.md`, "Choosing the default profile").
    pub fn kvroute(
        precise: Option<(Arc<Shared<PrefixIndex>>, &PrecisePrefixConfig)>,
        fallbacks: usize,
    ) -> Self {
        let approx = Arc::new(PrefixCacheScorer::new(&PrefixCacheConfig::default()));
        let load = Box::new(LoadScorer::default());
        let scorers: Vec<(Box<dyn Scorer>, f64)> = match precise {
            Some((index, config)) => {
                let precise = Arc::new(PrecisePrefixScorer::new(index, config));
                let ttft = TtftScorer::new(Some(Arc::clone(&precise)), Some(Arc::clone(&approx)));
                vec![
                    (Box::new(precise), 2.0),
                    (Box::new(approx), 2.0),
                    (Box::new(ttft), 4.0),
                    (load, 2.0),
                ]
            }
            None => vec![(Box::new(approx), 3.0), (load, 4.0)],
        };
        Self::new(scorers, fallbacks)
    }

    /// A profile of `(scorer, weight)` pairs choosing `fallbacks` extra endpoints.
    pub fn new(scorers: Vec<(Box<dyn Scorer>, f64)>, fallbacks: usize) -> Self {
        Self {
            scorers,
            fallbacks,
            cursor: AtomicUsize::new(0),
        }
    }
}

/// Totals closer than this are ties: they differ only by float noise.
const TIE: f64 = 1e-9;

impl Scheduler for Profile {
    fn schedule(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
    ) -> Result<Decision, ScheduleError> {
        let n = candidates.len();
        if n == 0 {
            return Err(ScheduleError::NoCandidates);
        }
        let mut totals = vec![0.0; n];
        let mut scores = vec![0.0; n];
        for (scorer, weight) in &self.scorers {
            scores.iter_mut().for_each(|s| *s = 0.0);
            scorer.score(request, candidates, &mut scores);
            for (t, s) in totals.iter_mut().zip(&scores) {
                let s = if s.is_finite() {
                    s.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                *t += weight * s;
            }
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        // Totals are compared at a resolution of TIE, so float noise ties; equal keys go by
        // their distance from the rotating start, which is the tie-break. (key, distance) is
        // a total order, so the best `fallbacks + 1` are selected in O(n) and only they are
        // sorted.
        let mut order: Vec<(f64, usize, usize)> = totals
            .iter()
            .enumerate()
            // `+ 0.0` makes a rounded -0.0 equal to 0.0 under `total_cmp`.
            .map(|(i, t)| ((t / TIE).round() + 0.0, (i + n - start) % n, i))
            .collect();
        let by = |a: &(f64, usize, usize), b: &(f64, usize, usize)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
        };
        let k = (self.fallbacks + 1).min(n);
        if k < n {
            order.select_nth_unstable_by(k - 1, by);
            order.truncate(k);
        }
        order.sort_unstable_by(by);
        let mut picked = order.iter().map(|&(_, _, i)| Arc::clone(&candidates[i]));
        let primary = picked.next().ok_or(ScheduleError::NoCandidates)?;
        let decision = Decision::new(primary, picked);
        for (scorer, _) in &self.scorers {
            scorer.decided(request, &decision);
        }
        Ok(decision)
    }
}

/// Prefers endpoints with fewer requests in flight: `(max − n) / max(max − min, headroom)`
/// over the candidates. Like the Inference Extension's min–max queue scorer, but a spread
/// smaller than `headroom` requests only costs its share, so a prefix-cache hit is not
/// given up for one request of imbalance. Uses kvroute's own in-flight counts.
#[derive(Debug)]
pub struct LoadScorer {
    headroom: usize,
}

impl LoadScorer {
    /// In-flight spread (requests) that counts in full; at least 1.
    pub fn new(headroom: usize) -> Self {
        Self {
            headroom: headroom.max(1),
        }
    }
}

impl Default for LoadScorer {
    /// A headroom of 8 requests.
    fn default() -> Self {
        Self::new(8)
    }
}

impl Scorer for LoadScorer {
    fn name(&self) -> &'static str {
        "load-scorer"
    }

    fn score(
        &self,
        _request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    ) {
        let loads: Vec<usize> = candidates.iter().map(|c| c.in_flight()).collect();
        let (Some(&min), Some(&max)) = (loads.iter().min(), loads.iter().max()) else {
            return;
        };
        let spread = (max - min).max(self.headroom) as f64;
        for (s, &l) in scores.iter_mut().zip(&loads) {
            *s = (max - l) as f64 / spread;
        }
    }
}

#[cfg(test)]
mod tests;
