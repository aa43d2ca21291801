use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
use kvroute_endpoints::{InFlightGuard, Registry};

use super::*;
use crate::test_util::registry;
use crate::{LoadScorer, Profile, ScheduleError, Scheduler};

fn chat(system: &str, question: &str) -> InferenceRequest {
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]
    });
    InferenceRequest::parse(
        ApiKind::ChatCompletions,
        body.to_string().as_bytes(),
        RequestHints::default(),
    )
    .unwrap()
}

fn default_profile() -> Profile {
    Profile::new(
        vec![
            (
                Box::new(PrefixCacheScorer::new(&PrefixCacheConfig::default())),
                3.0,
            ),
            (Box::new(LoadScorer::default()), 4.0),
        ],
        0,
    )
}

fn route(p: &Profile, reg: &Registry, req: &InferenceRequest) -> (u16, InFlightGuard) {
    let hints = RequestHints::default();
    let snapshot = reg.snapshot();
    let d = p
        .schedule(&SchedulingRequest::new(Some(req), &hints), &snapshot)
        .unwrap();
    (d.primary().address().port(), d.primary().acquire())
}

#[test]
fn requests_sharing_a_prefix_stick_while_load_allows() {
    let reg = registry(4);
    let p = default_profile();
    let system = "You are a meticulous assistant for the ACME support desk. ".repeat(40);
    let (home, _g0) = route(&p, &reg, &chat(&system, "first question"));
    let mut held = Vec::new();
    for i in 0..5 {
        let (port, g) = route(&p, &reg, &chat(&system, &format!("question {i}")));
        assert_eq!(
            port, home,
            "shared prefix goes home while home is a few requests busier"
        );
        held.push(g);
    }
    let home_ep = reg
        .snapshot()
        .iter()
        .find(|e| e.address().port() == home)
        .cloned()
        .unwrap();
    held.extend((0..10).map(|_| home_ep.acquire()));
    let (port, _g) = route(&p, &reg, &chat(&system, "one more"));
    assert_ne!(
        port, home,
        "home is 16 requests busier than the rest: load wins"
    );

    let (port, _g2) = route(&p, &reg, &chat("A different deployment entirely. ", "hi"));
    assert_ne!(port, home, "no shared prefix: the least loaded");
}

#[test]
fn scores_are_the_matched_share_of_the_prompt() {
    let reg = registry(2);
    let snapshot = reg.snapshot();
    let scorer = PrefixCacheScorer::new(&PrefixCacheConfig {
        chunk_bytes: 8,
        ..PrefixCacheConfig::default()
    });
    let hints = RequestHints::default();
    let first = chat("0123456789abcdef0123456789abcdef", "x");
    let req = SchedulingRequest::new(Some(&first), &hints);
    let d = Decision::new(Arc::clone(&snapshot[0]), []);
    scorer.decided(&req, &d);
    let n = req.approx_blocks.get().unwrap().len();
    assert!(n >= 4);

    let mut scores = [0.0; 2];
    scorer.score(&req, &snapshot, &mut scores);
    assert_eq!(scores, [1.0, 0.0]);

    let second = chat(
        "0123456789abcdef0123456789abcdef",
        "a longer question altogether",
    );
    let req2 = SchedulingRequest::new(Some(&second), &hints);
    let mut scores = [0.0; 2];
    scorer.score(&req2, &snapshot, &mut scores);
    let total = req2.approx_blocks.get().unwrap().len() as f64;
    assert!(scores[0] > 0.0 && scores[0] < 1.0, "{scores:?}");
    assert!(
        (scores[0] * total).fract().abs() < 1e-9,
        "a whole number of blocks"
    );
    assert_eq!(scores[1], 0.0);
    assert!(scorer.index().read().index().entries() >= n);
}

#[test]
fn requests_without_a_body_score_zero_and_empty_candidates_fail() {
    let reg = registry(2);
    let p = default_profile();
    let hints = RequestHints::default();
    let snapshot = reg.snapshot();
    let req = SchedulingRequest::new(None, &hints);
    assert!(p.schedule(&req, &snapshot).is_ok());
    assert!(req.approx_blocks.get().is_none());
    assert_eq!(
        p.schedule(&req, &[]).unwrap_err(),
        ScheduleError::NoCandidates
    );
}
