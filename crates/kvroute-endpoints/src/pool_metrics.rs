//! The pool metrics of upstream's endpoint picker, under its names (`llm_d_epp_*` and the
//! older `inference_pool_*` twins; llm-d-router `pkg/epp/metrics/metrics.go` and
//! `collectors/inference_pool.go`), read from the registry at scrape time, so that
//! dashboards built on the upstream picker keep working. Register in a registry without a
//! prefix: the names are upstream's, whole.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::{Health, Registry};

/// Averages over the pool's endpoints with a fresh scrape, the count of endpoints ready to
/// route to (present and not ejected), and each endpoint's queue.
#[derive(Debug)]
pub struct PoolCollector {
    registry: Arc<Registry>,
    pool: String,
    staleness: Duration,
}

impl PoolCollector {
    /// Collects for the pool named `pool` (the `name` label; empty without a pool); scrapes
    /// older than `staleness` are left out of the averages, as the scorers leave them out.
    pub fn new(registry: Arc<Registry>, pool: String, staleness: Duration) -> Self {
        Self {
            registry,
            pool,
            staleness,
        }
    }
}

/// A gauge under its current name and its older twin.
fn gauge_twice(
    encoder: &mut DescriptorEncoder,
    (name, legacy, help): (&str, &str, &str),
    series: &[(Vec<(&str, &str)>, f64)],
) -> Result<(), fmt::Error> {
    for (family, help) in [
        (name, format!("[ALPHA] {help}")),
        (legacy, format!("[ALPHA] [Deprecated: Use {name}] {help}")),
    ] {
        let mut metric = encoder.encode_descriptor(family, &help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
        }
    }
    Ok(())
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = self.registry.snapshot();
        let now = Instant::now();
        let fresh: Vec<_> = snapshot
            .iter()
            .filter_map(|ep| Some((ep, ep.fresh_load(now, self.staleness)?)))
            .collect();
        let average = |value: &dyn Fn(&crate::PodLoad) -> f64| {
            if fresh.is_empty() {
                0.0
            } else {
                fresh.iter().map(|(_, l)| value(l)).sum::<f64>() / fresh.len() as f64
            }
        };
        let pool = [("name", self.pool.as_str())];
        let ready = snapshot
            .iter()
            .filter(|ep| ep.health(now) != Health::Ejected)
            .count();
        let e = &mut encoder;
        gauge_twice(
            e,
            (
                "llm_d_epp_average_kv_cache_utilization",
                "inference_pool_average_kv_cache_utilization",
                "The average kv cache utilization for an inference server pool.",
            ),
            &[(pool.to_vec(), average(&|l| l.kv_usage))],
        )?;
        gauge_twice(
            e,
            (
                "llm_d_epp_average_queue_size",
                "inference_pool_average_queue_size",
                "The average number of requests pending in the model server queue.",
            ),
            &[(pool.to_vec(), average(&|l| f64::from(l.waiting)))],
        )?;
        gauge_twice(
            e,
            (
                "llm_d_epp_average_running_requests",
                "inference_pool_average_running_requests",
                "The average number of running requests across model servers in the pool.",
            ),
            &[(pool.to_vec(), average(&|l| f64::from(l.running)))],
        )?;
        gauge_twice(
            e,
            (
                "llm_d_epp_ready_endpoints",
                "inference_pool_ready_pods",
                "The number of ready endpoints in the inference server pool.",
            ),
            &[(pool.to_vec(), ready as f64)],
        )?;
        for (name, legacy, key) in [
            (
                "llm_d_epp_per_endpoint_queue_size",
                "",
                "model_server_endpoint",
            ),
            ("", "inference_pool_per_pod_queue_size", "model_server_pod"),
        ] {
            let (family, help) = if legacy.is_empty() {
                (name, "[ALPHA] The total number of requests pending in the model server queue for each underlying endpoint.".to_owned())
            } else {
                (legacy, "[ALPHA] [Deprecated: Use llm_d_epp_per_endpoint_queue_size] The total number of requests pending in the model server queue for each underlying pod.".to_owned())
            };
            let mut metric = e.encode_descriptor(family, &help, None, MetricType::Gauge)?;
            for (ep, load) in &fresh {
                let labels = [("name", self.pool.as_str()), (key, ep.id().as_str())];
                ConstGauge::new(f64::from(load.waiting)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
