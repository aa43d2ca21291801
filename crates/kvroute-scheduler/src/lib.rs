//! The scheduler: which endpoint serves a request.
//!
//! Owns the plugin framework that the ext_proc server and the benchmark call once per
//! request, configured as upstream's `EndpointPickerConfig` is ([`config`]): producers fill a
//! per-request [`CycleState`] (prompt blocks, what each index holds of them), a profile handler
//! chooses the profile to run, and the profile runs its filters, its weighted scorers and its
//! picker. Plugins read each other only through the cycle state's typed slots and name each
//! other in the configuration, never by holding one another; a decision is returned by value
//! and then shown to the plugins that keep state (the approximate index). It does no I/O and
//! never blocks; a warm scheduling cycle allocates nothing unless it tokenizes or returns
//! fallbacks.

pub mod admission;
pub mod config;
mod cycle;
mod framework;
mod plugin;
mod plugins;

use std::sync::Arc;

use kvroute_core::{InferenceRequest, RequestHints};
use kvroute_endpoints::EndpointState;

pub use config::{BuildContext, ConfigError, EndpointPickerConfig};
pub use cycle::{Candidates, CycleState, PrefixInfo, SlotId};
pub use framework::{Profile, Scheduler, SchedulerHandle};
pub use plugin::{
    BodyUse, Decider, Filter, Picker, Plugin, PrefillChoice, PrefillStageNames, Producer,
    ProfileHandler, Scorer,
};
pub use plugins::precise::Tokenizers;

/// What a scheduler is asked about one request.
#[derive(Clone, Copy, Debug)]
pub struct SchedulingRequest<'a> {
    /// The parsed body; `None` for requests routed by load alone (no body, or not an
    /// inference API).
    pub request: Option<&'a InferenceRequest>,
    /// Header-borne hints, present even without a body.
    pub hints: &'a RequestHints,
    /// When it is scheduled, for plugins that keep time; `None`: now.
    at: Option<std::time::Instant>,
}

impl<'a> SchedulingRequest<'a> {
    /// A request to schedule.
    pub fn new(request: Option<&'a InferenceRequest>, hints: &'a RequestHints) -> Self {
        Self {
            request,
            hints,
            at: None,
        }
    }

    /// The same request, scheduled at `at` (the benchmark's simulated clock).
    pub fn at(mut self, at: std::time::Instant) -> Self {
        self.at = Some(at);
        self
    }

    /// When it is scheduled.
    pub fn now(&self) -> std::time::Instant {
        self.at.unwrap_or_else(std::time::Instant::now)
    }
}

/// Where a request goes: the primary, then fallbacks in order, and what the primary is
/// expected to compute of it.
#[derive(Clone, Debug)]
pub struct Decision {
    primary: Arc<EndpointState>,
    fallbacks: Vec<Arc<EndpointState>>,
    prefill_tokens: u64,
    prefill: Option<(Arc<EndpointState>, u64)>,
    response_headers: Vec<(&'static str, String)>,
}

impl Decision {
    /// A decision for `primary`, then `fallbacks`, expecting `prefill_tokens` uncached prompt
    /// tokens on the primary.
    pub fn new(
        primary: Arc<EndpointState>,
        fallbacks: Vec<Arc<EndpointState>>,
        prefill_tokens: u64,
    ) -> Self {
        Self {
            primary,
            fallbacks,
            prefill_tokens,
            prefill: None,
            response_headers: Vec::new(),
        }
    }

    /// The same decision with the prompt computed on `endpoint` first (disaggregated
    /// serving), which is expected to compute `tokens` of it; the primary then computes
    /// nothing but what it decodes.
    pub fn with_prefill(mut self, endpoint: Arc<EndpointState>, tokens: u64) -> Self {
        self.prefill = Some((endpoint, tokens));
        self.prefill_tokens = 0;
        self
    }

    /// The endpoint that computes the prompt before the primary decodes (the routing
    /// sidecar's `x-prefiller-host-port`), with the prompt tokens it is expected to compute.
    pub fn prefill(&self) -> Option<(&Arc<EndpointState>, u64)> {
        self.prefill.as_ref().map(|(e, t)| (e, *t))
    }

    /// Headers the response should carry back to the client (set by plugins such as
    /// session affinity); empty for most decisions.
    pub fn response_headers(&self) -> &[(&'static str, String)] {
        &self.response_headers
    }

    /// Prompt tokens the primary is expected to compute (those no prefix producer saw cached
    /// there; 0 without a body): the caller counts them in the primary's prefill backlog
    /// (`EndpointState::acquire_with_prefill`).
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens
    }

    /// The endpoint the request is sent to first.
    pub fn primary(&self) -> &Arc<EndpointState> {
        &self.primary
    }

    /// The endpoints to try next, best first.
    pub fn fallbacks(&self) -> &[Arc<EndpointState>] {
        &self.fallbacks
    }

    /// The primary, then the fallbacks.
    pub fn targets(&self) -> impl Iterator<Item = &Arc<EndpointState>> {
        std::iter::once(&self.primary).chain(&self.fallbacks)
    }
}

/// Why no endpoint was chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// No candidate endpoint exists (none known, or all excluded by the data plane's subset).
    #[error("no endpoint available")]
    NoCandidates,
    /// Endpoints exist but the profile's filters excluded every one.
    #[error("every endpoint was filtered out")]
    AllFiltered,
}

/// The position of endpoint `id` among `endpoints` (sorted by id, as schedulers get them).
fn endpoint_index(
    endpoints: &[Arc<EndpointState>],
    id: &kvroute_core::EndpointId,
) -> Option<usize> {
    endpoints.binary_search_by(|c| c.id().cmp(id)).ok()
}

#[cfg(test)]
mod test_util {
    pub(crate) use test_support::completion as request;
    pub(crate) use test_support::endpoints as registry;
}
