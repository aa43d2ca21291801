use kvroute_core::RequestHints;
use kvroute_endpoints::Registry;

use super::*;
use crate::test_util::registry;

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

// Least in flight: a profile with a full-spread load scorer.

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
