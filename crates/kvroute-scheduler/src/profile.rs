use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvroute_endpoints::EndpointState;

use crate::{Decision, ScheduleError, Scheduler, SchedulingRequest};

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
        // Candidates in rotated order, then a stable sort by total: equal totals keep the
        // rotation, which is the tie-break.
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // Totals are compared at a resolution of TIE, so float noise ties (and the order
        // stays a total order for the sort); equal keys keep the rotation.
        let key = |i: usize| (totals[i] / TIE).round();
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
        let mut picked = order
            .iter()
            .take(self.fallbacks + 1)
            .map(|&i| Arc::clone(&candidates[i]));
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
mod tests {
    use kvroute_core::{Endpoint, RequestHints};
    use kvroute_endpoints::Registry;

    use super::*;

    /// Scores by port: a fixed opinion to check weighting and clamping.
    #[derive(Debug)]
    struct ByPort(f64);

    impl Scorer for ByPort {
        fn name(&self) -> &'static str {
            "by-port"
        }

        fn score(&self, _: &SchedulingRequest<'_>, c: &[Arc<EndpointState>], scores: &mut [f64]) {
            for (s, e) in scores.iter_mut().zip(c) {
                *s = f64::from(e.address().port()) * self.0;
            }
        }
    }

    fn registry(n: u16) -> Registry {
        let reg = Registry::new();
        reg.replace(
            (1..=n)
                .map(|p| Endpoint::from_address(([127, 0, 0, 1], p).into()))
                .collect(),
        );
        reg
    }

    fn ports(p: &Profile, reg: &Registry) -> Vec<u16> {
        let hints = RequestHints::default();
        p.schedule(&SchedulingRequest::new(None, &hints), &reg.snapshot())
            .unwrap()
            .targets()
            .iter()
            .map(|e| e.address().port())
            .collect()
    }

    #[test]
    fn highest_weighted_total_wins_and_fallbacks_follow() {
        let reg = registry(3);
        let p = Profile::new(vec![(Box::new(ByPort(0.1)), 1.0)], 2);
        assert_eq!(ports(&p, &reg), [3, 2, 1]);
        let p = Profile::new(vec![(Box::new(ByPort(-0.1)), 1.0)], 0);
        let first: Vec<u16> = (0..3).map(|_| ports(&p, &reg)[0]).collect();
        assert_eq!(first.len(), 3);
        let mut sorted = first.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            3,
            "negative scores clamp to 0: all tie and take turns"
        );
    }

    #[test]
    fn load_scorer_counts_spread_within_headroom_partially() {
        let reg = registry(3);
        let snap = reg.snapshot();
        let _g = [snap[0].acquire(), snap[0].acquire()];
        let hints = RequestHints::default();
        let mut scores = [0.0; 3];
        LoadScorer::new(8).score(&SchedulingRequest::new(None, &hints), &snap, &mut scores);
        assert_eq!(scores, [0.0, 0.25, 0.25]);
        LoadScorer::new(1).score(&SchedulingRequest::new(None, &hints), &snap, &mut scores);
        assert_eq!(scores, [0.0, 1.0, 1.0]);
    }
}

#[cfg(test)]
mod least_in_flight_tests {
    use std::sync::Arc;

    use kvroute_core::{Endpoint, RequestHints};
    use kvroute_endpoints::{EndpointState, Registry};

    use crate::{Decision, Profile, ScheduleError, Scheduler, SchedulingRequest};

    fn registry(n: u16) -> Registry {
        let reg = Registry::new();
        reg.replace(
            (1..=n)
                .map(|p| Endpoint::from_address(([127, 0, 0, 1], p).into()))
                .collect(),
        );
        reg
    }

    fn pick(s: &Profile, c: &[Arc<EndpointState>]) -> Result<Decision, ScheduleError> {
        let hints = RequestHints::default();
        s.schedule(&SchedulingRequest::new(None, &hints), c)
    }

    #[test]
    fn empty_candidates_is_an_error() {
        assert_eq!(
            pick(&Profile::least_in_flight(0), &[]).unwrap_err(),
            ScheduleError::NoCandidates
        );
    }

    #[test]
    fn least_loaded_wins_and_ties_rotate() {
        let reg = registry(3);
        let c = reg.snapshot();
        let s = Profile::least_in_flight(0);
        let _busy: Vec<_> = (0..2).map(|_| c[0].acquire()).collect();
        let _one = c[1].acquire();
        for _ in 0..5 {
            assert_eq!(pick(&s, &c).unwrap().primary().address().port(), 3);
        }
        drop(_one);
        let ports: Vec<u16> = (0..4)
            .map(|_| pick(&s, &c).unwrap().primary().address().port())
            .collect();
        assert!(ports.contains(&2) && ports.contains(&3), "{ports:?}");
        assert!(!ports.contains(&1), "{ports:?}");
    }

    #[test]
    fn holding_guards_spreads_load_evenly() {
        let reg = registry(4);
        let c = reg.snapshot();
        let s = Profile::least_in_flight(0);
        let guards: Vec<_> = (0..40)
            .map(|_| pick(&s, &c).unwrap().primary().acquire())
            .collect();
        assert!(c.iter().all(|e| e.in_flight() == 10));
        drop(guards);
        assert!(c.iter().all(|e| e.in_flight() == 0));
    }

    #[test]
    fn fallbacks_are_ordered_by_load() {
        let reg = registry(3);
        let c = reg.snapshot();
        let s = Profile::least_in_flight(5);
        let _g = [c[0].acquire(), c[0].acquire(), c[2].acquire()];
        let d = pick(&s, &c).unwrap();
        let ports: Vec<u16> = d.targets().iter().map(|e| e.address().port()).collect();
        assert_eq!(ports, vec![2, 3, 1], "all three, least loaded first");
    }
}
