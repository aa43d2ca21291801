//! The plugin contract. A plugin is one configured instance of a type
//! (`prefix-cache-scorer`, `max-score-picker`, …) and plays one or more roles; the framework
//! asks for each role it needs. Plugins are shared by every request stream, so whatever state
//! they keep sits behind atomics or locks they have measured.

use std::fmt::Debug;
use std::sync::Arc;

use kvroute_core::EndpointId;
use kvroute_endpoints::EndpointState;

use crate::{Candidates, CycleState, Decision, Profile, SchedulingRequest, SlotId};

/// One configured plugin.
pub trait Plugin: Send + Sync + Debug + 'static {
    /// The type name, as an `EndpointPickerConfig` writes it.
    fn type_name(&self) -> &'static str;

    /// Its producer role: fills a cycle-state slot before filters and scorers run.
    fn producer(&self) -> Option<&dyn Producer> {
        None
    }

    /// Its filter role.
    fn filter(&self) -> Option<&dyn Filter> {
        None
    }

    /// Its scorer role.
    fn scorer(&self) -> Option<&dyn Scorer> {
        None
    }

    /// Its picker role.
    fn picker(&self) -> Option<&dyn Picker> {
        None
    }

    /// Its profile-handler role.
    fn profile_handler(&self) -> Option<&dyn ProfileHandler> {
        None
    }

    /// Its decider role: whether a request's prefill runs on a pod of its own.
    fn decider(&self) -> Option<&dyn Decider> {
        None
    }

    /// Prefix slots this plugin reads (producers it names), so that the framework runs them
    /// even when no profile lists them.
    fn reads(&self) -> &[SlotId] {
        &[]
    }

    /// The prefix slot this plugin writes as a producer.
    fn writes(&self) -> Option<SlotId> {
        None
    }

    /// A request was routed: plugins that keep state remember it (the approximate prefix
    /// producer records the prompt's blocks against the primary).
    fn decided(&self, _request: &SchedulingRequest<'_>, _state: &CycleState, _decision: &Decision) {
    }

    /// A header the response should carry back to the client for this decision (the
    /// session affinity token).
    fn response_header(&self, _decision: &Decision) -> Option<(&'static str, String)> {
        None
    }

    /// The endpoint set changed: drop whatever is held for `departed` endpoints.
    fn endpoints_changed(&self, _current: &[Arc<EndpointState>], _departed: &[EndpointId]) {}

    /// What of the request body this plugin reads, so that the request path does no body
    /// work that no configured plugin needs.
    fn body_use(&self) -> BodyUse {
        BodyUse::None
    }
}

/// How much of a request's body a plugin (or a whole scheduler) needs, in increasing cost.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub enum BodyUse {
    /// Headers are enough: the body can pass by unread (Envoy need not even send it).
    #[default]
    None,
    /// The parsed body: model, prompt text.
    Parsed,
    /// The prompt's token ids: the body is parsed and tokenized, which can take
    /// milliseconds for a long cold prompt.
    Tokenized,
}

/// Computes data other plugins read, once per request, before any profile runs.
pub trait Producer: Send + Sync {
    /// Fills this producer's slots of `state` for `endpoints` (every endpoint of the cycle,
    /// sorted by id; per-endpoint slots are indexed by position in it).
    fn produce(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        state: &mut CycleState,
    );
}

/// Excludes candidates.
pub trait Filter: Send + Sync {
    /// Sets `keep[i]` to false for each candidate `i` to exclude (all true on entry).
    fn filter(
        &self,
        request: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        keep: &mut [bool],
    );
}

/// One opinion about where a request should go.
pub trait Scorer: Send + Sync {
    /// Writes one score per candidate into `scores` (zeroed on entry). Scores are in [0, 1],
    /// higher is better; the framework clamps whatever else is written (NaN counts 0).
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    );
}

/// Chooses among scored candidates.
pub trait Picker: Send + Sync {
    /// Appends up to this picker's number of endpoints to `out`, best first, as candidate
    /// indexes. `totals` holds each candidate's weighted score; `turn` advances by one per
    /// request, for pickers that break ties by rotation or need a seed.
    fn pick(&self, totals: &[f64], turn: u64, out: &mut Vec<usize>);
}

/// Chooses which profiles run for a request and whose result routes it.
pub trait ProfileHandler: Send + Sync {
    /// The index of the profile (among `profiles`, as configured) that routes this request.
    fn profile(&self, request: &SchedulingRequest<'_>, profiles: &[Profile]) -> usize;

    /// The profile that routes every request, when the handler names one (checked when
    /// the configuration is built).
    fn primary_profile(&self) -> Option<&str> {
        None
    }

    /// Disaggregated serving: the profile that picks a separate prefill endpoint, and the
    /// decider plugin that approves it per request, both by name (resolved when the
    /// configuration is built). `None`: every request is served whole where it is routed.
    fn prefill_stage(&self) -> Option<PrefillStageNames<'_>> {
        None
    }
}

/// Names a prefill stage (see [`ProfileHandler::prefill_stage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillStageNames<'a> {
    /// The profile that chooses the prefill endpoint.
    pub profile: &'a str,
    /// The decider plugin that approves running it.
    pub decider: &'a str,
    /// A profile that routes the request whole when a stage finds no endpoint.
    pub fallback: Option<&'a str>,
}

/// Decides, once the primary (decode) endpoint is chosen, whether the prompt is worth
/// computing on a separate prefill endpoint and moving.
pub trait Decider: Send + Sync {
    /// `prompt_tokens` long, of which the chosen decode endpoint holds `cached_tokens`.
    fn disaggregate(
        &self,
        request: &SchedulingRequest<'_>,
        prompt_tokens: u64,
        cached_tokens: u64,
    ) -> bool;

    /// Once the prefill profile has chosen its endpoint: whether moving the prompt there
    /// still pays. By default it does.
    fn confirm(&self, _choice: &PrefillChoice<'_>) -> bool {
        true
    }
}

/// A prefill endpoint chosen for a request, beside its decode endpoint (see
/// [`Decider::confirm`]).
#[derive(Clone, Copy, Debug)]
pub struct PrefillChoice<'a> {
    /// The prompt's length in tokens.
    pub prompt_tokens: u64,
    /// The decode endpoint.
    pub decode: &'a EndpointState,
    /// Prompt tokens the decode endpoint holds cached.
    pub decode_cached: u64,
    /// The prefill endpoint.
    pub prefill: &'a EndpointState,
    /// Prompt tokens the prefill endpoint holds cached.
    pub prefill_cached: u64,
}
