use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::Registry;

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
        let mut metric = encoder.encode_descriptor(
            "endpoint_in_flight_requests",
            "Requests routed to the endpoint whose response has not ended.",
            None,
            MetricType::Gauge,
        )?;
        for ep in snapshot.iter() {
            let labels = [("endpoint", ep.id().as_str())];
            let gauge = ConstGauge::new(i64::try_from(ep.in_flight()).unwrap_or(i64::MAX));
            gauge.encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "endpoint_prefill_backlog_tokens",
            "Prompt tokens routed to the endpoint, expected uncached, whose first output token has not come back.",
            None,
            MetricType::Gauge,
        )?;
        for ep in snapshot.iter() {
            let labels = [("endpoint", ep.id().as_str())];
            let gauge = ConstGauge::new(i64::try_from(ep.prefill_backlog()).unwrap_or(i64::MAX));
            gauge.encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "endpoint_kv_events_confirmed",
            "1 while the endpoint's KV-event stream is followed and in sequence (its precise cache entries are trusted), else 0.",
            None,
            MetricType::Gauge,
        )?;
        for ep in snapshot.iter() {
            let labels = [("endpoint", ep.id().as_str())];
            ConstGauge::new(i64::from(ep.events_confirmed()))
                .encode(metric.encode_family(&labels)?)?;
        }
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
    }
}
