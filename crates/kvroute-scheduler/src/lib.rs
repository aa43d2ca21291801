//! The scheduler: which endpoint serves a request.
//!
//! Owns the [`Scheduler`] interface that the ext_proc server calls once per request, and the
//! built-in policies behind it. A scheduler sees the parsed request (or none, for requests
//! routed by load alone) and a snapshot of candidate endpoints, and answers with an ordered
//! list: the primary target, then fallbacks. It does no I/O and never blocks.

mod precise;
mod prefix;
mod profile;
mod ttft;

use std::cell::OnceCell;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvroute_core::{BlockHash, EndpointId, InferenceRequest, RequestHints};
use kvroute_endpoints::EndpointState;
use kvroute_index::EndpointMatch;

pub use precise::{PrecisePrefixConfig, PrecisePrefixScorer, Tokenizers};
pub use prefix::{PrefixCacheConfig, PrefixCacheScorer};
pub use profile::{LoadScorer, Profile, Scorer};
pub use ttft::TtftScorer;

/// What a scheduler is asked about one request.
#[derive(Debug)]
pub struct SchedulingRequest<'a> {
    /// The parsed body; `None` for requests routed by load alone (no body, or not an
    /// inference API).
    pub request: Option<&'a InferenceRequest>,
    /// Header-borne hints, present even without a body.
    pub hints: &'a RequestHints,
    /// The prompt's approximate block hashes, computed at most once per request by
    /// whichever plugin needs them first (scoring, then recording the decision).
    pub approx_blocks: OnceCell<Vec<BlockHash>>,
    /// The prompt's length in tokens and its token-block hashes, computed at most once per
    /// request (`None`: the prompt could not be tokenized).
    pub token_blocks: OnceCell<Option<(usize, Vec<BlockHash>)>>,
    /// What the precise index holds of the prompt, looked up once per request and shared by
    /// the scorers that read it.
    pub precise_matches: OnceCell<Vec<EndpointMatch>>,
    /// What the approximate index held of the prompt when the request was scored (before
    /// the decision records it), looked up once per request.
    pub approx_matches: OnceCell<Vec<EndpointMatch>>,
}

impl<'a> SchedulingRequest<'a> {
    /// A request to schedule.
    pub fn new(request: Option<&'a InferenceRequest>, hints: &'a RequestHints) -> Self {
        Self {
            request,
            hints,
            approx_blocks: OnceCell::new(),
            token_blocks: OnceCell::new(),
            precise_matches: OnceCell::new(),
            approx_matches: OnceCell::new(),
        }
    }
}

/// The position of endpoint `id` among `candidates` (sorted by id, as schedulers get them).
fn candidate_index(candidates: &[Arc<EndpointState>], id: &EndpointId) -> Option<usize> {
    candidates.binary_search_by(|c| c.id().cmp(id)).ok()
}

/// Where a request goes: the primary, then fallbacks in order. Never empty.
#[derive(Debug)]
pub struct Decision {
    targets: Vec<Arc<EndpointState>>,
    prefill_tokens: AtomicU64,
}

impl Clone for Decision {
    fn clone(&self) -> Self {
        Self {
            targets: self.targets.clone(),
            prefill_tokens: AtomicU64::new(self.prefill_tokens()),
        }
    }
}

impl Decision {
    /// A decision for `primary`, then `fallbacks`.
    pub fn new(
        primary: Arc<EndpointState>,
        fallbacks: impl IntoIterator<Item = Arc<EndpointState>>,
    ) -> Self {
        let mut targets = vec![primary];
        targets.extend(fallbacks);
        Self {
            targets,
            prefill_tokens: AtomicU64::new(0),
        }
    }

    /// Prompt tokens the primary is expected to compute (those it does not hold cached), as
    /// estimated by a scorer that knows (0 if none did): the caller counts them in the
    /// primary's prefill backlog (`EndpointState::acquire_with_prefill`).
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }

    /// Records the primary's expected prefill, for the caller to account.
    pub fn set_prefill_tokens(&self, tokens: u64) {
        self.prefill_tokens.store(tokens, Ordering::Relaxed);
    }

    /// The endpoint the request is sent to first.
    pub fn primary(&self) -> &Arc<EndpointState> {
        // Invariant: `new` is the only constructor and always puts a primary first.
        &self.targets[0]
    }

    /// The primary, then the fallbacks.
    pub fn targets(&self) -> &[Arc<EndpointState>] {
        &self.targets
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

#[cfg(test)]
mod test_util {
    use kvroute_core::Endpoint;
    use kvroute_endpoints::Registry;

    /// `n` endpoints on 127.0.0.1, ports 1 to `n`.
    pub(crate) fn registry(n: u16) -> Registry {
        let reg = Registry::new();
        reg.replace(
            (1..=n)
                .map(|p| Endpoint::from_address(([127, 0, 0, 1], p).into()))
                .collect(),
        );
        reg
    }
}
