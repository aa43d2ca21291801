//! The request metrics of upstream's endpoint picker, under its names, so that dashboards
//! and alerts built on it keep working when kvroute takes its place: the `llm_d_epp_*`
//! families of llm-d-router, each with its older `inference_objective_*` /
//! `inference_extension_*` twin, which llm-d-router still emits beside them
//! (`pkg/epp/metrics/metrics.go`, `llm_d_router_metrics.go` at llm-d-router `ebab687`).
//! Labels, help texts and bucket boundaries are upstream's; `model_name` values are capped
//! at 1,000 distinct names (the rest read `other`), as upstream caps them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvroute_core::Priorities;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::usage::Usage;

/// Distinct `model_name` values kept before the rest are folded into `other`.
pub const MAX_MODEL_LABELS: usize = 1_000;

/// model_name, target_model_name, fairness_id, priority.
type RequestLabels = [(&'static str, String); 4];
type ErrorLabels = [(&'static str, String); 5];
type TtftLabels = [(&'static str, String); 5];

const GENERAL_LATENCY: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
const TTFT: [f64; 24] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0,
];
const INPUT_TOKENS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
const OUTPUT_TOKENS: [f64; 12] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
const SCHEDULER: [f64; 10] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];

/// One family under its current name and its older twin, written together.
#[derive(Clone, Debug)]
struct Twin<L, M, C = fn() -> M> {
    current: Family<L, M, C>,
    legacy: Family<L, M, C>,
}

/// The upstream-named metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    requests: Twin<RequestLabels, Counter>,
    errors: Twin<ErrorLabels, Counter>,
    duration: Twin<RequestLabels, Histogram>,
    ttft: Family<TtftLabels, Histogram>,
    input_tokens: Twin<RequestLabels, Histogram>,
    output_tokens: Twin<RequestLabels, Histogram>,
    cached_tokens: Twin<RequestLabels, Histogram>,
    running: Family<RequestLabels, Gauge>,
    running_legacy: Family<[(&'static str, String); 1], Gauge>,
    scheduler: Histogram,
    scheduler_legacy: Histogram,
    models: Arc<Mutex<HashSet<String>>>,
    priorities: Option<Arc<dyn Priorities>>,
}

fn general_latency_buckets() -> Histogram {
    Histogram::new(GENERAL_LATENCY.iter().copied())
}

fn ttft_buckets() -> Histogram {
    Histogram::new(TTFT.iter().copied())
}

fn input_tokens_buckets() -> Histogram {
    Histogram::new(INPUT_TOKENS.iter().copied())
}

fn output_tokens_buckets() -> Histogram {
    Histogram::new(OUTPUT_TOKENS.iter().copied())
}

impl UpstreamMetrics {
    /// Creates the metrics and registers them in `registry`, which must have no prefix
    /// (the names are upstream's, whole). `priorities` gives a request's priority label
    /// from its objective (0 without one, as upstream reads it).
    pub fn register(registry: &mut Registry, priorities: Option<Arc<dyn Priorities>>) -> Self {
        let twin = |registry: &mut Registry, name: &str, legacy: &str, help: &str| {
            let t = Twin {
                current: Family::<RequestLabels, Counter>::default(),
                legacy: Family::default(),
            };
            registry.register(name, format!("[ALPHA] {help}"), t.current.clone());
            registry.register(
                legacy,
                format!("[ALPHA] [Deprecated: Use {name}_total] {help}"),
                t.legacy.clone(),
            );
            t
        };
        let requests = twin(
            registry,
            "llm_d_epp_request",
            "inference_objective_request",
            "Total number of processed requests.",
        );
        let errors = Twin {
            current: Family::<ErrorLabels, Counter>::default(),
            legacy: Family::default(),
        };
        registry.register(
            "llm_d_epp_request_error",
            "[ALPHA] Total number of request errors.",
            errors.current.clone(),
        );
        registry.register(
            "inference_objective_request_error",
            "[ALPHA] [Deprecated: Use llm_d_epp_request_error_total] Total number of request errors.",
            errors.legacy.clone(),
        );
        let hist_twin = |registry: &mut Registry,
                         name: &str,
                         legacy: &str,
                         help: &str,
                         buckets: fn() -> Histogram| {
            let current = Family::new_with_constructor(buckets);
            let old = Family::new_with_constructor(buckets);
            registry.register(name, format!("[ALPHA] {help}"), current.clone());
            registry.register(
                legacy,
                format!("[ALPHA] [Deprecated: Use {name}] {help}"),
                old.clone(),
            );
            Twin {
                current,
                legacy: old,
            }
        };
        let duration = hist_twin(
            registry,
            "llm_d_epp_request_duration_seconds",
            "inference_objective_request_duration_seconds",
            "End-to-end request latency distribution in seconds.",
            general_latency_buckets,
        );
        let input_tokens = hist_twin(
            registry,
            "llm_d_epp_request_input_tokens",
            "inference_objective_input_tokens",
            "Input token count distribution per request.",
            input_tokens_buckets,
        );
        let output_tokens = hist_twin(
            registry,
            "llm_d_epp_request_output_tokens",
            "inference_objective_output_tokens",
            "Output token count distribution per request.",
            output_tokens_buckets,
        );
        let cached_tokens = hist_twin(
            registry,
            "llm_d_epp_request_cached_tokens",
            "inference_objective_prompt_cached_tokens",
            "Distribution of prompt tokens read from cache per request, as reported by the model server in the response.",
            input_tokens_buckets,
        );
        let ttft = Family::new_with_constructor(ttft_buckets as fn() -> Histogram);
        registry.register(
            "llm_d_epp_request_ttft_seconds",
            "[ALPHA] Time to first token in seconds, measured from request received to first response byte. For non-streaming requests, this equals total request duration.",
            ttft.clone(),
        );
        let running = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "llm_d_epp_request_running",
            "[ALPHA] Current number of active running requests.",
            running.clone(),
        );
        let running_legacy = Family::default();
        registry.register(
            "inference_objective_running_requests",
            "[ALPHA] [Deprecated: Use llm_d_epp_request_running] Inference objective number of running requests in each model.",
            running_legacy.clone(),
        );
        let scheduler = Histogram::new(SCHEDULER.iter().copied());
        let scheduler_legacy = Histogram::new(SCHEDULER.iter().copied());
        registry.register(
            "llm_d_epp_scheduler_e2e_duration_seconds",
            "[ALPHA] End-to-end scheduling latency distribution in seconds.",
            scheduler.clone(),
        );
        registry.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "[ALPHA] [Deprecated: Use llm_d_epp_scheduler_e2e_duration_seconds] End-to-end scheduling latency distribution in seconds.",
            scheduler_legacy.clone(),
        );
        let info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        let info_legacy = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        let build = [
            ("commit", env!("CARGO_PKG_VERSION")),
            ("build_ref", "kvroute"),
        ];
        info.get_or_create(&build).set(1);
        info_legacy.get_or_create(&build).set(1);
        registry.register(
            "llm_d_epp_info",
            "[ALPHA] General information of the current build of Inference Extension.",
            info,
        );
        registry.register(
            "inference_extension_info",
            "[ALPHA] [Deprecated: Use llm_d_epp_info] General information of the current build of Inference Extension.",
            info_legacy,
        );
        Self {
            requests,
            errors,
            duration,
            ttft,
            input_tokens,
            output_tokens,
            cached_tokens,
            running,
            running_legacy,
            scheduler,
            scheduler_legacy,
            models: Arc::default(),
            priorities,
        }
    }

    /// The labels of a request for `model` (empty when unknown), its fairness id and
    /// objective; starts its record.
    pub(crate) fn start(
        &self,
        model: &str,
        fairness_id: &str,
        objective: Option<&str>,
    ) -> RequestRecord {
        let model = self.model_label(model);
        let priority = objective
            .and_then(|o| self.priorities.as_ref()?.priority(o))
            .unwrap_or(0);
        let labels: RequestLabels = [
            ("model_name", model.clone()),
            ("target_model_name", model),
            ("fairness_id", fairness_id.to_owned()),
            ("priority", priority.to_string()),
        ];
        self.requests.current.get_or_create(&labels).inc();
        self.requests.legacy.get_or_create(&labels).inc();
        RequestRecord {
            labels: Arc::new(labels),
            started: Instant::now(),
            first_byte: false,
            running: false,
        }
    }

    fn model_label(&self, model: &str) -> String {
        if model.is_empty() {
            return String::new();
        }
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if models.contains(model) {
            return model.to_owned();
        }
        if models.len() < MAX_MODEL_LABELS {
            models.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }

    /// One scheduling decision took `seconds`.
    pub(crate) fn scheduled(&self, seconds: f64) {
        self.scheduler.observe(seconds);
        self.scheduler_legacy.observe(seconds);
    }

    /// The request failed with upstream's error `code` (a local reply, or
    /// `ModelServerError` for an answer that is not 200).
    pub(crate) fn error(&self, record: &RequestRecord, code: &str) {
        let [a, b, c, d] = (*record.labels).clone();
        let labels: ErrorLabels = [a, b, c, d, ("error_code", code.to_owned())];
        self.errors.current.get_or_create(&labels).inc();
        self.errors.legacy.get_or_create(&labels).inc();
    }

    /// The request was sent to a model server: running until [`UpstreamMetrics::ended`].
    pub(crate) fn dispatched(&self, record: &mut RequestRecord) {
        if !record.running {
            record.running = true;
            self.running.get_or_create(&record.labels).inc();
            self.running_legacy
                .get_or_create(&[("model_name", record.labels[0].1.clone())])
                .inc();
        }
    }

    /// The first bytes of the answer came back.
    pub(crate) fn first_byte(&self, record: &mut RequestRecord, streaming: bool) {
        if record.first_byte {
            return;
        }
        record.first_byte = true;
        let [a, b, c, d] = (*record.labels).clone();
        let labels: TtftLabels = [a, b, c, d, ("streaming", streaming.to_string())];
        self.ttft
            .get_or_create(&labels)
            .observe(record.started.elapsed().as_secs_f64());
    }

    /// The request is over (answered in full, or gone); `usage` when the answer said it.
    pub(crate) fn ended(&self, record: &mut RequestRecord, usage: Option<&Usage>, complete: bool) {
        if record.running {
            record.running = false;
            self.running.get_or_create(&record.labels).dec();
            self.running_legacy
                .get_or_create(&[("model_name", record.labels[0].1.clone())])
                .dec();
        }
        if complete {
            let seconds = record.started.elapsed().as_secs_f64();
            self.duration
                .current
                .get_or_create(&record.labels)
                .observe(seconds);
            self.duration
                .legacy
                .get_or_create(&record.labels)
                .observe(seconds);
        }
        if let Some(u) = usage {
            for (twin, n) in [
                (&self.input_tokens, u.prompt_tokens),
                (&self.output_tokens, u.completion_tokens),
            ] {
                twin.current.get_or_create(&record.labels).observe(n as f64);
                twin.legacy.get_or_create(&record.labels).observe(n as f64);
            }
            if let Some(cached) = u.cached_tokens {
                self.cached_tokens
                    .current
                    .get_or_create(&record.labels)
                    .observe(cached as f64);
                self.cached_tokens
                    .legacy
                    .get_or_create(&record.labels)
                    .observe(cached as f64);
            }
        }
    }
}

/// One request's labels and timings, from the moment its model is known.
#[derive(Debug)]
pub(crate) struct RequestRecord {
    labels: Arc<RequestLabels>,
    started: Instant,
    first_byte: bool,
    running: bool,
}

impl RequestRecord {
    /// Counts from `at` (the request headers' arrival) rather than from the record's
    /// creation.
    pub(crate) fn since(mut self, at: Instant) -> Self {
        self.started = at;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Priorities for Fixed {
        fn priority(&self, objective: &str) -> Option<i32> {
            (objective == "critical").then_some(10)
        }
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_request_is_counted_under_both_names_with_upstreams_labels() {
        let mut prom = Registry::default();
        let m = UpstreamMetrics::register(&mut prom, Some(Arc::new(Fixed)));
        let mut r = m.start("qwen", "tenant-a", Some("critical"));
        m.dispatched(&mut r);
        let running = text(&prom);
        assert!(running.contains(r#"llm_d_epp_request_running{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 1"#), "{running}");
        assert!(running.contains(r#"inference_objective_running_requests{model_name="qwen"} 1"#));
        m.first_byte(&mut r, true);
        let usage = Usage {
            prompt_tokens: 100,
            completion_tokens: 5,
            cached_tokens: Some(64),
        };
        m.ended(&mut r, Some(&usage), true);
        let t = text(&prom);
        for want in [
            r#"llm_d_epp_request_total{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 1"#,
            r#"inference_objective_request_total{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 1"#,
            r#"llm_d_epp_request_running{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 0"#,
            r#"llm_d_epp_request_ttft_seconds_count{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10",streaming="true"} 1"#,
            r#"llm_d_epp_request_duration_seconds_count{"#,
            r#"inference_objective_request_duration_seconds_count{"#,
            r#"llm_d_epp_request_cached_tokens_sum{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 64.0"#,
            r#"inference_objective_input_tokens_sum{model_name="qwen",target_model_name="qwen",fairness_id="tenant-a",priority="10"} 100.0"#,
            "# HELP llm_d_epp_request [ALPHA] Total number of processed requests.",
            r#"llm_d_epp_info{commit="#,
            r#"inference_extension_info{commit="#,
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        let plain = m.start("qwen", "", None);
        m.error(&plain, "ModelServerError");
        let t = text(&prom);
        assert!(t.contains(r#"llm_d_epp_request_error_total{model_name="qwen",target_model_name="qwen",fairness_id="",priority="0",error_code="ModelServerError"} 1"#), "{t}");
    }

    #[test]
    fn model_names_beyond_the_cap_read_other() {
        let mut prom = Registry::default();
        let m = UpstreamMetrics::register(&mut prom, None);
        for i in 0..MAX_MODEL_LABELS + 5 {
            m.start(&format!("model-{i}"), "", None);
        }
        let t = text(&prom);
        let series = t
            .lines()
            .filter(|l| l.starts_with("llm_d_epp_request_total{"))
            .count();
        assert_eq!(series, MAX_MODEL_LABELS + 1, "the cap plus other");
        assert!(t.contains(r#"llm_d_epp_request_total{model_name="other",target_model_name="other",fairness_id="",priority="0"} 5"#));
        m.start("model-3", "", None);
        assert!(text(&prom).contains(r#"llm_d_epp_request_total{model_name="model-3",target_model_name="model-3",fairness_id="",priority="0"} 2"#));
    }
}
