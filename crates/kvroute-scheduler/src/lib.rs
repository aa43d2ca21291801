//! The scheduler: which endpoint serves a request.
//!
//! Owns the [`Scheduler`] interface that the ext_proc server calls once per request, and the
//! built-in policies behind it. A scheduler sees the parsed request (or none, for requests
//! routed by load alone) and a snapshot of candidate endpoints, and answers with an ordered
//! list: the primary target, then fallbacks. It does no I/O and never blocks.

mod least_in_flight;

use std::fmt::Debug;
use std::sync::Arc;

use kvroute_core::{InferenceRequest, RequestHints};
use kvroute_endpoints::EndpointState;

pub use least_in_flight::LeastInFlight;

/// What a scheduler is asked about one request.
#[derive(Clone, Copy, Debug)]
pub struct SchedulingRequest<'a> {
    /// The parsed body; `None` for requests routed by load alone (no body, or not an
    /// inference API).
    pub request: Option<&'a InferenceRequest>,
    /// Header-borne hints, present even without a body.
    pub hints: &'a RequestHints,
}

/// Where a request goes: `targets[0]` is the primary, the rest are fallbacks in order.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Never empty.
    pub targets: Vec<Arc<EndpointState>>,
}

impl Decision {
    /// The endpoint the request is sent to first.
    pub fn primary(&self) -> &Arc<EndpointState> {
        // Invariant: a Decision is only built with at least one target.
        &self.targets[0]
    }
}

/// Why no endpoint was chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// No candidate endpoint exists (none known, or all excluded by the data plane's subset).
    #[error("no endpoint available")]
    NoCandidates,
}

/// A routing policy. Implementations are shared by every request stream, so they keep their
/// own state behind atomics or locks they have measured.
pub trait Scheduler: Send + Sync + Debug + 'static {
    /// Picks targets among `candidates` (sorted by endpoint id, possibly empty).
    fn schedule(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
    ) -> Result<Decision, ScheduleError>;
}
