//! Session affinity: the turns of one conversation to the endpoint that served it, as a
//! soft preference (`session-affinity-scorer`) or a hard pin (`session-affinity-filter`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kvroute_core::EndpointId;
use kvroute_endpoints::EndpointState;

use crate::{Candidates, CycleState, Decision, Filter, Plugin, SchedulingRequest, Scorer};

/// The header upstream's default strategy carries the serving endpoint in.
pub(crate) const SESSION_TOKEN_HEADER: &str = "x-session-token";

/// Sessions remembered at most by the `session_id` strategy: a client sending a new id with
/// every request cannot grow the table without bound.
const MAX_SESSIONS: usize = 100_000;

/// How a session is recognised (upstream's `strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// The router answers with the serving endpoint, base64-encoded, in `x-session-token`;
    /// the client sends it back (`encoded_endpoint_header`, upstream's default).
    EncodedEndpoint,
    /// The client names its session (`x-session-id`); the router remembers where it went
    /// (`session_id`).
    SessionId,
}

/// What a session-affinity plugin does with the session's endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Scores it 1 and every other candidate 0 (`session-affinity-scorer`): other scorers
    /// can outweigh it.
    Scorer,
    /// Keeps it alone when it is a candidate, else keeps every candidate
    /// (`session-affinity-filter`): a hard pin that never empties the candidates.
    Filter,
}

/// The endpoint that served the request's session before, as upstream's
/// `session-affinity-scorer` (1 for it, 0 elsewhere) or `session-affinity-filter` (only it,
/// when it is a candidate) sees it; both set the same token on the response.
#[derive(Debug)]
pub(crate) struct SessionAffinity {
    role: Role,
    strategy: Strategy,
    ttl: Duration,
    sessions: Mutex<HashMap<String, (EndpointId, Instant)>>,
}

impl SessionAffinity {
    pub(crate) fn new(role: Role, strategy: Strategy, ttl: Duration) -> Self {
        Self {
            role,
            strategy,
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The endpoint the request's session went to, if known.
    fn previous(&self, request: &SchedulingRequest<'_>) -> Option<String> {
        match self.strategy {
            Strategy::EncodedEndpoint => {
                let token = request.hints.session_token.as_deref()?;
                String::from_utf8(STANDARD.decode(token.trim()).ok()?).ok()
            }
            Strategy::SessionId => {
                let id = request.hints.session_id.as_deref()?;
                let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
                let (endpoint, at) = sessions.get(id)?;
                (at.elapsed() < self.ttl).then(|| endpoint.as_str().to_owned())
            }
        }
    }
}

impl Plugin for SessionAffinity {
    fn type_name(&self) -> &'static str {
        match self.role {
            Role::Scorer => "session-affinity-scorer",
            Role::Filter => "session-affinity-filter",
        }
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        (self.role == Role::Scorer).then_some(self as &dyn Scorer)
    }

    fn filter(&self) -> Option<&dyn Filter> {
        (self.role == Role::Filter).then_some(self as &dyn Filter)
    }

    fn decided(&self, request: &SchedulingRequest<'_>, _: &CycleState, decision: &Decision) {
        if self.strategy != Strategy::SessionId {
            return;
        }
        let Some(id) = request.hints.session_id.as_deref() else {
            return;
        };
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock the pruning takes (see `EndpointState::departed`).
        if decision.primary().departed() {
            return;
        }
        if sessions.len() >= MAX_SESSIONS && !sessions.contains_key(id) {
            let ttl = self.ttl;
            sessions.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if sessions.len() >= MAX_SESSIONS {
                return;
            }
        }
        sessions.insert(id.to_owned(), (decision.primary().id().clone(), now));
    }

    fn response_header(&self, decision: &Decision) -> Option<(&'static str, String)> {
        (self.strategy == Strategy::EncodedEndpoint).then(|| {
            (
                SESSION_TOKEN_HEADER,
                STANDARD.encode(decision.primary().id().as_str()),
            )
        })
    }

    fn endpoints_changed(&self, _: &[Arc<EndpointState>], departed: &[EndpointId]) {
        if departed.is_empty() {
            return;
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, (endpoint, _)| !departed.contains(endpoint));
    }
}

impl Filter for SessionAffinity {
    fn filter(
        &self,
        request: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        keep: &mut [bool],
    ) {
        let Some(previous) = self.previous(request) else {
            return;
        };
        let Some(at) = candidates
            .iter()
            .position(|(_, ep)| ep.id().as_str() == previous)
        else {
            // Gone, or filtered out before: the other plugins decide.
            return;
        };
        for (i, k) in keep.iter_mut().enumerate() {
            *k = i == at;
        }
    }
}

impl Scorer for SessionAffinity {
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some(previous) = self.previous(request) else {
            return;
        };
        for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
            if ep.id().as_str() == previous {
                *s = 1.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::RequestHints;

    use super::*;
    use crate::test_util::registry;

    fn score(s: &SessionAffinity, hints: &RequestHints, eps: &[Arc<EndpointState>]) -> Vec<f64> {
        let kept: Vec<usize> = (0..eps.len()).collect();
        let mut out = vec![0.0; eps.len()];
        s.score(
            &SchedulingRequest::new(None, hints),
            &CycleState::new(0),
            &Candidates::new(eps, &kept),
            &mut out,
        );
        out
    }

    #[test]
    fn the_encoded_endpoint_comes_back_in_the_token() {
        let eps = registry(3).snapshot();
        let s = SessionAffinity::new(
            Role::Scorer,
            Strategy::EncodedEndpoint,
            Duration::from_secs(300),
        );
        let decision = Decision::new(Arc::clone(&eps[1]), Vec::new(), 0);
        let (name, token) = s.response_header(&decision).unwrap();
        assert_eq!(name, "x-session-token");
        assert_eq!(token, STANDARD.encode("127.0.0.1:2"));
        let hints = RequestHints {
            session_token: Some(token),
            ..RequestHints::default()
        };
        assert_eq!(score(&s, &hints, &eps), [0.0, 1.0, 0.0]);
        // Garbage or no token: no opinion.
        for token in [Some("%%%".to_owned()), None] {
            let hints = RequestHints {
                session_token: token,
                ..RequestHints::default()
            };
            assert_eq!(score(&s, &hints, &eps), [0.0; 3]);
        }
    }

    #[test]
    fn a_session_id_is_remembered_until_its_endpoint_leaves_or_it_expires() {
        let eps = registry(3).snapshot();
        let s = SessionAffinity::new(Role::Scorer, Strategy::SessionId, Duration::from_secs(300));
        let hints = RequestHints {
            session_id: Some("chat-7".into()),
            ..RequestHints::default()
        };
        assert_eq!(score(&s, &hints, &eps), [0.0; 3]);
        let decision = Decision::new(Arc::clone(&eps[2]), Vec::new(), 0);
        s.decided(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &decision,
        );
        assert!(s.response_header(&decision).is_none());
        assert_eq!(score(&s, &hints, &eps), [0.0, 0.0, 1.0]);
        s.endpoints_changed(&eps[..2], &[eps[2].id().clone()]);
        assert_eq!(score(&s, &hints, &eps), [0.0; 3]);
        let short = SessionAffinity::new(Role::Scorer, Strategy::SessionId, Duration::ZERO);
        short.decided(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &decision,
        );
        assert_eq!(score(&short, &hints, &eps), [0.0; 3], "expired");
    }

    fn keep(
        s: &SessionAffinity,
        hints: &RequestHints,
        eps: &[Arc<EndpointState>],
        kept: &[usize],
    ) -> Vec<bool> {
        let mut out = vec![true; kept.len()];
        Filter::filter(
            s,
            &SchedulingRequest::new(None, hints),
            &CycleState::new(0),
            &Candidates::new(eps, kept),
            &mut out,
        );
        out
    }

    #[test]
    fn the_filter_keeps_the_session_endpoint_alone_when_it_is_a_candidate_else_all() {
        let eps = registry(3).snapshot();
        let s = SessionAffinity::new(
            Role::Filter,
            Strategy::EncodedEndpoint,
            Duration::from_secs(300),
        );
        assert_eq!(s.type_name(), "session-affinity-filter");
        assert!(s.scorer().is_none() && Plugin::filter(&s).is_some());
        let decision = Decision::new(Arc::clone(&eps[2]), Vec::new(), 0);
        let (name, token) = s.response_header(&decision).unwrap();
        assert_eq!(name, "x-session-token");
        let hints = RequestHints {
            session_token: Some(token),
            ..RequestHints::default()
        };
        assert_eq!(keep(&s, &hints, &eps, &[0, 1, 2]), [false, false, true]);
        // Among fewer candidates (an earlier filter left two): still found by identity.
        assert_eq!(keep(&s, &hints, &eps, &[1, 2]), [false, true]);
        // The session's endpoint is not a candidate (filtered out, or gone): all stay.
        assert_eq!(keep(&s, &hints, &eps, &[0, 1]), [true, true]);
        // No token, a token that is not base64, one naming no endpoint: all stay.
        let other = STANDARD.encode("10.0.0.9:8000");
        for token in [None, Some("%%%".to_owned()), Some(other)] {
            let hints = RequestHints {
                session_token: token,
                ..RequestHints::default()
            };
            assert_eq!(keep(&s, &hints, &eps, &[0, 1, 2]), [true; 3]);
        }
    }

    #[test]
    fn the_filter_by_session_id_pins_once_bound_and_rebinds_where_the_request_went() {
        let eps = registry(3).snapshot();
        let s = SessionAffinity::new(Role::Filter, Strategy::SessionId, Duration::from_secs(300));
        let hints = RequestHints {
            session_id: Some("agent-1".into()),
            ..RequestHints::default()
        };
        let request = SchedulingRequest::new(None, &hints);
        assert_eq!(keep(&s, &hints, &eps, &[0, 1, 2]), [true; 3], "unbound");
        s.decided(
            &request,
            &CycleState::new(0),
            &Decision::new(Arc::clone(&eps[0]), Vec::new(), 0),
        );
        assert_eq!(keep(&s, &hints, &eps, &[0, 1, 2]), [true, false, false]);
        // Its endpoint filtered out: no pin, and the session follows where it was sent.
        assert_eq!(keep(&s, &hints, &eps, &[1, 2]), [true, true]);
        s.decided(
            &request,
            &CycleState::new(0),
            &Decision::new(Arc::clone(&eps[1]), Vec::new(), 0),
        );
        assert_eq!(keep(&s, &hints, &eps, &[0, 1, 2]), [false, true, false]);
    }
}
