//! Profile handlers, and the deciders of disaggregated serving.

use crate::{
    BodyUse, Decider, Plugin, PrefillChoice, PrefillStageNames, Profile, ProfileHandler,
    SchedulingRequest,
};

/// Runs the one configured profile (`single-profile-handler`).
#[derive(Debug)]
pub(crate) struct SingleProfileHandler;

impl Plugin for SingleProfileHandler {
    fn type_name(&self) -> &'static str {
        "single-profile-handler"
    }

    fn profile_handler(&self) -> Option<&dyn ProfileHandler> {
        Some(self)
    }
}

impl ProfileHandler for SingleProfileHandler {
    fn profile(&self, _: &SchedulingRequest<'_>, _: &[Profile]) -> usize {
        0
    }
}

/// Disaggregated serving, decode first (`disagg-profile-handler`): the decode profile
/// routes every request; when the prefill decider approves, the prefill profile then picks
/// the pod that computes the prompt, which the decode pod's routing sidecar is told of.
/// Without a prefill decider every request is served whole on its decode pod, as upstream.
#[derive(Debug)]
pub(crate) struct DisaggProfileHandler {
    decode: String,
    prefill: String,
    decider: Option<String>,
    fallback: Option<String>,
}

impl DisaggProfileHandler {
    pub(crate) fn new(
        decode: String,
        prefill: String,
        decider: Option<String>,
        fallback: Option<String>,
    ) -> Self {
        Self {
            decode,
            prefill,
            decider,
            fallback,
        }
    }
}

impl Plugin for DisaggProfileHandler {
    fn type_name(&self) -> &'static str {
        "disagg-profile-handler"
    }

    fn profile_handler(&self) -> Option<&dyn ProfileHandler> {
        Some(self)
    }

    fn body_use(&self) -> BodyUse {
        // A decider weighs the prompt's length.
        if self.decider.is_some() {
            BodyUse::Parsed
        } else {
            BodyUse::None
        }
    }
}

impl ProfileHandler for DisaggProfileHandler {
    fn profile(&self, _: &SchedulingRequest<'_>, profiles: &[Profile]) -> usize {
        // The configuration is refused without the decode profile, so this always finds it.
        profiles
            .iter()
            .position(|p| p.name() == self.decode)
            .unwrap_or(0)
    }

    fn primary_profile(&self) -> Option<&str> {
        Some(&self.decode)
    }

    fn prefill_stage(&self) -> Option<PrefillStageNames<'_>> {
        Some(PrefillStageNames {
            profile: &self.prefill,
            decider: self.decider.as_deref()?,
            fallback: self.fallback.as_deref(),
        })
    }
}

/// Disaggregates when the part of the prompt the decode pod lacks is long enough
/// (`prefix-based-pd-decider`): below `nonCachedTokens` uncached tokens, moving the KV
/// cache costs more than computing it where it decodes. 0 turns it off, as upstream.
#[derive(Debug)]
pub(crate) struct PrefixBasedDecider {
    non_cached_tokens: u64,
    prompt_tokens: u64,
}

impl PrefixBasedDecider {
    pub(crate) fn new(non_cached_tokens: u64, prompt_tokens: u64) -> Self {
        Self {
            non_cached_tokens,
            prompt_tokens,
        }
    }
}

impl Plugin for PrefixBasedDecider {
    fn type_name(&self) -> &'static str {
        "prefix-based-pd-decider"
    }

    fn decider(&self) -> Option<&dyn Decider> {
        Some(self)
    }
}

impl Decider for PrefixBasedDecider {
    fn disaggregate(&self, _: &SchedulingRequest<'_>, prompt: u64, cached: u64) -> bool {
        self.non_cached_tokens > 0
            && prompt >= self.prompt_tokens
            && prompt.saturating_sub(cached) >= self.non_cached_tokens
    }
}

/// Disaggregates every request that has a prompt (`always-disagg-pd-decider`).
#[derive(Debug)]
pub(crate) struct AlwaysDisaggDecider;

impl Plugin for AlwaysDisaggDecider {
    fn type_name(&self) -> &'static str {
        "always-disagg-pd-decider"
    }

    fn decider(&self) -> Option<&dyn Decider> {
        Some(self)
    }
}

impl Decider for AlwaysDisaggDecider {
    fn disaggregate(&self, _: &SchedulingRequest<'_>, _: u64, _: u64) -> bool {
        true
    }
}

/// kvroute's own decider (`ttft-pd-decider`): as `prefix-based-pd-decider` (at least
/// `nonCachedTokens` of the prompt missing on the decode pod), and only while the chosen
/// prefill pod would start the prompt no later than `maxTtftRatio` times what the decode pod
/// would take to compute it itself, by the time-to-first-token model of `ttft-scorer`
/// (prefill queued there plus the part of the prompt it lacks). Moving prompts to prefill
/// pods spares decode pods' running requests the prefill steps; when the prefill pods fall
/// behind, a prompt is computed where it decodes instead of waiting in their queue.
#[derive(Debug)]
pub(crate) struct TtftPdDecider {
    threshold: PrefixBasedDecider,
    max_ratio: f64,
}

impl TtftPdDecider {
    pub(crate) fn new(non_cached_tokens: u64, max_ratio: f64) -> Self {
        Self {
            threshold: PrefixBasedDecider::new(non_cached_tokens, 0),
            max_ratio,
        }
    }
}

impl Plugin for TtftPdDecider {
    fn type_name(&self) -> &'static str {
        "ttft-pd-decider"
    }

    fn decider(&self) -> Option<&dyn Decider> {
        Some(self)
    }
}

impl Decider for TtftPdDecider {
    fn disaggregate(&self, request: &SchedulingRequest<'_>, prompt: u64, cached: u64) -> bool {
        self.threshold.disaggregate(request, prompt, cached)
    }

    fn confirm(&self, c: &PrefillChoice<'_>) -> bool {
        let predicted = |backlog: u64, cached: u64| {
            backlog as f64 + c.prompt_tokens.saturating_sub(cached) as f64 + 1.0
        };
        let remote = predicted(c.prefill.prefill_backlog(), c.prefill_cached);
        let local = predicted(c.decode.prefill_backlog(), c.decode_cached);
        remote <= self.max_ratio * local
    }
}
