use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use std::time::Instant;

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::{EndpointState, Health, Registry};

/// Exports each endpoint's in-flight count at scrape time, read from the same atomics the
/// scheduler reads, so the request path pays nothing for the metric.
#[derive(Debug)]
pub struct InFlightCollector(Arc<Registry>);

impl InFlightCollector {
    /// Collects from `registry` on every scrape.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self(registry)
    }
}

impl Collector for InFlightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = self.0.snapshot();
        family(
            &mut encoder,
            &snapshot,
            (
                "endpoint_in_flight_requests",
                "Requests routed to the endpoint whose response has not ended.",
                MetricType::Gauge,
            ),
            |ep| {
                Some(ConstGauge::new(
                    i64::try_from(ep.in_flight()).unwrap_or(i64::MAX),
                ))
            },
        )?;
        family(
            &mut encoder,
            &snapshot,
            (
                "endpoint_prefill_backlog_tokens",
                "Prompt tokens routed to the endpoint, expected uncached, whose first output token has not come back.",
                MetricType::Gauge,
            ),
            |ep| {
                Some(ConstGauge::new(
                    i64::try_from(ep.prefill_backlog()).unwrap_or(i64::MAX),
                ))
            },
        )?;
        family(
            &mut encoder,
            &snapshot,
            (
                "endpoint_kv_events_confirmed",
                "1 while the endpoint's KV-event stream is followed and in sequence (its precise cache entries are trusted), else 0.",
                MetricType::Gauge,
            ),
            |ep| Some(ConstGauge::new(i64::from(ep.events_confirmed()))),
        )?;
        family(
            &mut encoder,
            &snapshot,
            (
                "endpoint_prefill_us_per_token",
                "Microseconds a queued prompt token has cost the endpoint, learnt from its first answer bytes (endpoints that have taught it).",
                MetricType::Gauge,
            ),
            |ep| ep.prefill_us_per_token().map(ConstGauge::new),
        )?;
        family(
            &mut encoder,
            &snapshot,
            (
                "endpoint_prompt_bytes_per_token",
                "Prompt bytes per token of the endpoint's tokenizer, learnt from the prompt_tokens its answers report, or from the pod's own count of its prompts (endpoints that have taught it).",
                MetricType::Gauge,
            ),
            |ep| ep.prompt_bytes_per_token().map(ConstGauge::new),
        )?;
        let metric = encoder.encode_descriptor(
            "endpoints",
            "Endpoints currently known to the router.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(snapshot.len()).unwrap_or(i64::MAX)).encode(metric)?;
        Ok(())
    }
}

/// Exports each endpoint's scraped load and passive health at scrape time, read from the
/// registry, so a departed endpoint's series vanish with it.
#[derive(Debug)]
pub struct LoadCollector(Arc<Registry>);

impl LoadCollector {
    /// Collects from `registry` on every scrape.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self(registry)
    }
}

/// Writes one family: one series per endpoint for which `value` has something to say.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Arc<EndpointState>],
    (name, help, kind): (&str, &str, MetricType),
    value: impl Fn(&EndpointState) -> Option<M>,
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for ep in endpoints {
        if let Some(v) = value(ep) {
            let labels = [("endpoint", ep.id().as_str())];
            v.encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for LoadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = self.0.snapshot();
        let eps = snapshot.as_slice();
        let now = Instant::now();
        let e = &mut encoder;
        family(
            e,
            eps,
            (
                "endpoint_scrape_age_seconds",
                "Age of the endpoint's last successful /metrics scrape.",
                MetricType::Gauge,
            ),
            |ep| {
                let at = ep.scraped().as_ref()?.at;
                Some(ConstGauge::new(
                    now.saturating_duration_since(at).as_secs_f64(),
                ))
            },
        )?;
        family(
            e,
            eps,
            (
                "endpoint_scrape_errors",
                "Failed scrapes of the endpoint's /metrics: refused, timed out, not 200, too large or unparseable.",
                MetricType::Counter,
            ),
            |ep| Some(ConstCounter::new(ep.scrape_errors())),
        )?;
        family(
            e,
            eps,
            (
                "endpoint_ejections",
                "Times the endpoint was ejected by passive health (consecutive failed requests).",
                MetricType::Counter,
            ),
            |ep| Some(ConstCounter::new(ep.ejections())),
        )?;
        family(
            e,
            eps,
            (
                "endpoint_ejected",
                "1 while the endpoint is ejected by passive health, else 0.",
                MetricType::Gauge,
            ),
            |ep| {
                Some(ConstGauge::new(i64::from(
                    ep.health(now) == Health::Ejected,
                )))
            },
        )?;
        family(
            e,
            eps,
            (
                "endpoint_queue_size",
                "Requests waiting at the endpoint, as its last scrape said (vllm:num_requests_waiting).",
                MetricType::Gauge,
            ),
            |ep| {
                Some(ConstGauge::new(i64::from(
                    ep.scraped().as_ref()?.load.waiting,
                )))
            },
        )?;
        family(
            e,
            eps,
            (
                "endpoint_running_requests",
                "Requests running at the endpoint, as its last scrape said (vllm:num_requests_running).",
                MetricType::Gauge,
            ),
            |ep| {
                Some(ConstGauge::new(i64::from(
                    ep.scraped().as_ref()?.load.running,
                )))
            },
        )?;
        family(
            e,
            eps,
            (
                "endpoint_kv_cache_utilization",
                "KV-cache use of the endpoint in 0 to 1, as its last scrape said.",
                MetricType::Gauge,
            ),
            |ep| Some(ConstGauge::new(ep.scraped().as_ref()?.load.kv_usage)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::Endpoint;
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn exports_live_counts() {
        let reg = Arc::new(Registry::new());
        reg.replace(vec![Endpoint::from_address(([127, 0, 0, 1], 1).into())]);
        let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
        prom.register_collector(Box::new(InFlightCollector::new(Arc::clone(&reg))));
        let _g = reg.snapshot()[0].acquire_with_prefill(42);
        let mut out = String::new();
        encode(&mut out, &prom).unwrap();
        assert!(!out.contains(".."), "one full stop per help text: {out}");
        assert!(
            out.contains(r#"kvroute_endpoint_in_flight_requests{endpoint="127.0.0.1:1"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"kvroute_endpoint_prefill_backlog_tokens{endpoint="127.0.0.1:1"} 42"#),
            "{out}"
        );
        assert!(
            out.contains(r#"kvroute_endpoint_kv_events_confirmed{endpoint="127.0.0.1:1"} 0"#),
            "{out}"
        );
        assert!(out.contains("kvroute_endpoints 1"), "{out}");
        assert!(
            !out.contains("kvroute_endpoint_prompt_bytes_per_token{"),
            "not learnt: {out}"
        );
        for _ in 0..4 {
            reg.snapshot()[0].observe_answer(2_500, Some(1_000));
        }
        let mut out = String::new();
        encode(&mut out, &prom).unwrap();
        assert!(
            out.contains(r#"kvroute_endpoint_prompt_bytes_per_token{endpoint="127.0.0.1:1"} 2.5"#),
            "{out}"
        );
    }

    #[test]
    fn exports_load_and_health_of_listed_endpoints_only() {
        let reg = Arc::new(Registry::new());
        reg.replace(vec![
            Endpoint::from_address(([127, 0, 0, 1], 1).into()),
            Endpoint::from_address(([127, 0, 0, 1], 2).into()),
        ]);
        let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
        prom.register_collector(Box::new(LoadCollector::new(Arc::clone(&reg))));
        let snap = reg.snapshot();
        let now = Instant::now();
        snap[0].record_scrape(
            crate::PodLoad {
                waiting: 7,
                running: 3,
                kv_usage: 0.25,
                ..Default::default()
            },
            now,
        );
        for _ in 0..5 {
            snap[1].record_scrape_error();
            snap[1].record_outcome(false, now);
        }
        let mut out = String::new();
        encode(&mut out, &prom).unwrap();
        assert!(!out.contains(".."), "one full stop per help text: {out}");
        for want in [
            r#"kvroute_endpoint_queue_size{endpoint="127.0.0.1:1"} 7"#,
            r#"kvroute_endpoint_running_requests{endpoint="127.0.0.1:1"} 3"#,
            r#"kvroute_endpoint_kv_cache_utilization{endpoint="127.0.0.1:1"} 0.25"#,
            r#"kvroute_endpoint_scrape_age_seconds{endpoint="127.0.0.1:1"} "#,
            r#"kvroute_endpoint_scrape_errors_total{endpoint="127.0.0.1:1"} 0"#,
            r#"kvroute_endpoint_scrape_errors_total{endpoint="127.0.0.1:2"} 5"#,
            r#"kvroute_endpoint_ejections_total{endpoint="127.0.0.1:2"} 1"#,
            r#"kvroute_endpoint_ejected{endpoint="127.0.0.1:2"} 1"#,
            r#"kvroute_endpoint_ejected{endpoint="127.0.0.1:1"} 0"#,
        ] {
            assert!(out.contains(want), "{want} in {out}");
        }
        assert!(
            !out.contains(r#"kvroute_endpoint_queue_size{endpoint="127.0.0.1:2"}"#),
            "never scraped: no load series"
        );

        reg.replace(vec![Endpoint::from_address(([127, 0, 0, 1], 1).into())]);
        let mut out = String::new();
        encode(&mut out, &prom).unwrap();
        assert!(!out.contains("127.0.0.1:2"), "departed: series gone: {out}");
    }
}
