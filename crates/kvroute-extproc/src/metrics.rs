//! The ext_proc server's metrics, registered under the caller's prefix (`kvroute_`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::usage::Usage;

/// How a request left kvroute's hands; one label value per way.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Routed after reading the body.
    Routed,
    /// Routed by load alone: no body, or not an inference API.
    RoutedByLoad,
    /// Answered 400: the body is not a valid inference request.
    BadRequest,
    /// Answered 413: the body is over the limit.
    BodyTooLarge,
    /// Answered 503: no endpoint to route to.
    NoEndpoint,
    /// Answered 503: the decision pool's queue was full.
    Overloaded,
    /// Its stream was refused: `--max-streams` were open.
    TooManyStreams,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::RoutedByLoad => "routed_by_load",
            Self::BadRequest => "bad_request",
            Self::BodyTooLarge => "body_too_large",
            Self::NoEndpoint => "no_endpoint",
            Self::Overloaded => "overloaded",
            Self::TooManyStreams => "too_many_streams",
        }
    }
}

type Labels1 = [(&'static str, &'static str); 1];
type TokenLabels = [(&'static str, String); 2];

/// Handles to every ext_proc metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<Labels1, Counter>,
    responses: Family<Labels1, Counter>,
    decision_seconds: Histogram,
    tokens: Family<TokenLabels, Counter>,
    stream_errors: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            decision_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 22)),
            tokens: Family::default(),
            stream_errors: Counter::default(),
        };
        registry.register(
            "requests",
            "Requests by how kvroute answered them (outcome)",
            m.requests.clone(),
        );
        registry.register(
            "responses",
            "Responses of routed requests by status class, or aborted before they ended",
            m.responses.clone(),
        );
        registry.register(
            "decision_duration_seconds",
            "Time from a complete request body to the routing decision (parse and schedule)",
            m.decision_seconds.clone(),
        );
        registry.register(
            "endpoint_tokens",
            "Tokens reported in responses' usage, per endpoint and kind (prompt, completion, cached)",
            m.tokens.clone(),
        );
        registry.register(
            "extproc_stream_errors",
            "ext_proc streams that ended in a protocol error",
            m.stream_errors.clone(),
        );
        m
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
    }

    pub(crate) fn decision(&self, seconds: f64) {
        self.decision_seconds.observe(seconds);
    }

    pub(crate) fn response(&self, status: Option<u16>) {
        let class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
            None => "aborted",
        };
        self.responses.get_or_create(&[("class", class)]).inc();
    }

    pub(crate) fn usage(&self, endpoint: &str, usage: &Usage) {
        let add = |kind, n| {
            if n > 0 {
                self.tokens
                    .get_or_create(&[
                        ("endpoint", endpoint.to_owned()),
                        ("kind", String::from(kind)),
                    ])
                    .inc_by(n);
            }
        };
        add("prompt", usage.prompt_tokens);
        add("completion", usage.completion_tokens);
        add("cached", usage.cached_tokens.unwrap_or(0));
    }

    pub(crate) fn stream_error(&self) {
        self.stream_errors.inc();
    }
}
