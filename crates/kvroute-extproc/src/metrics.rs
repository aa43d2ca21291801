//! The ext_proc server's metrics, registered under the caller's prefix (`kvroute_`).

use std::sync::{Arc, Mutex, PoisonError};

use kvroute_core::EndpointId;
use kvroute_endpoints::{EndpointState, EndpointsListener};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::upstream::UpstreamMetrics;
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
    /// Its stream was ended: no answer within `--stream-request-timeout`.
    RequestTimeout,
    /// Answered 429 `rejected-saturated` by admission.
    RejectedSaturated,
    /// Answered 429 `rejected-ttl-expired`: waited in the flow-control queue for its TTL.
    RejectedTtlExpired,
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
            Self::RequestTimeout => "request_timeout",
            Self::RejectedSaturated => "rejected_saturated",
            Self::RejectedTtlExpired => "rejected_ttl_expired",
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
    /// Held while a per-endpoint series is written for an endpoint checked to be present,
    /// and while a departed endpoint's series are removed: a response that ends just as its
    /// endpoint leaves never brings the series back.
    endpoint_series: Arc<Mutex<()>>,
    /// Upstream's names for the same events, when asked for ([`Metrics::with_upstream`]).
    pub(crate) upstream: Option<UpstreamMetrics>,
}

/// The `kind` label values of `endpoint_tokens`.
const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            decision_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 22)),
            tokens: Family::default(),
            stream_errors: Counter::default(),
            endpoint_series: Arc::default(),
            upstream: None,
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

    /// Also records every request under upstream's metric names (`upstream`).
    pub fn with_upstream(mut self, upstream: UpstreamMetrics) -> Self {
        self.upstream = Some(upstream);
        self
    }

    pub(crate) fn decision(&self, seconds: f64) {
        self.decision_seconds.observe(seconds);
        if let Some(u) = &self.upstream {
            u.scheduled(seconds);
        }
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

    pub(crate) fn usage(&self, endpoint: &EndpointState, usage: &Usage) {
        let _held = self
            .endpoint_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if endpoint.departed() {
            return;
        }
        let counts = [
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens.unwrap_or(0),
        ];
        for (kind, n) in TOKEN_KINDS.into_iter().zip(counts) {
            if n > 0 {
                self.tokens
                    .get_or_create(&[
                        ("endpoint", endpoint.id().to_string()),
                        ("kind", String::from(kind)),
                    ])
                    .inc_by(n);
            }
        }
    }

    pub(crate) fn stream_error(&self) {
        self.stream_errors.inc();
    }
}

impl EndpointsListener for Metrics {
    /// Drops the departed endpoints' token series, so that a pool that churns pods does not
    /// grow `/metrics` without bound.
    fn endpoints_changed(&self, _current: &[Arc<EndpointState>], departed: &[EndpointId]) {
        let _held = self
            .endpoint_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for id in departed {
            for kind in TOKEN_KINDS {
                self.tokens
                    .remove(&[("endpoint", id.to_string()), ("kind", String::from(kind))]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_departed_endpoints_token_series_go_and_stay_gone() {
        let mut prom = Registry::default();
        let metrics = Metrics::register(&mut prom);
        let endpoints = test_support::endpoints(2);
        endpoints.subscribe(Arc::new(metrics.clone()));
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 2,
            cached_tokens: Some(4),
        };
        let snapshot = endpoints.snapshot();
        let (a, b) = (&snapshot[0], &snapshot[1]);
        metrics.usage(a, &usage);
        metrics.usage(b, &usage);
        let a_label = format!("endpoint=\"{}\"", a.id());
        assert_eq!(text(&prom).matches(&a_label).count(), 3);

        endpoints.replace(vec![b.endpoint().clone()]);
        assert!(!text(&prom).contains(&a_label), "{}", text(&prom));
        // A response that ends after its endpoint left adds nothing back.
        metrics.usage(a, &usage);
        let after = text(&prom);
        assert!(!after.contains(&a_label), "{after}");
        assert!(after.contains(&format!("endpoint=\"{}\"", b.id())));
    }
}
