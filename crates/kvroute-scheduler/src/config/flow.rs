//! Upstream's `flowControl` and `saturationDetector` sections and the `utilization-detector`
//! plugin's parameters, read as upstream's Go types read them (Kubernetes quantities, Go
//! durations), every value checked while the YAML is read so an error names its line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};

use crate::admission::{
    BandLimits, DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, DEFAULT_KV_CACHE_UTIL_THRESHOLD,
    DEFAULT_METRICS_STALENESS, DEFAULT_QUEUE_DEPTH_THRESHOLD, FlowSettings, UtilizationDetector,
    check_headroom,
};

/// Upstream's fairness policy, the one kvroute applies: strict order across flows.
const FAIRNESS_POLICY: &str = "global-strict-fairness-policy";
/// Upstream's ordering policy, the one kvroute applies: first come, first served.
const ORDERING_POLICY: &str = "fcfs-ordering-policy";

/// `saturationDetector: {pluginRef}` (top level, deprecated, or under `flowControl`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DetectorRef {
    pub(crate) plugin_ref: Option<String>,
}

/// The `flowControl` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FlowControlSpec {
    max_bytes: Option<Quantity>,
    max_requests: Option<Quantity>,
    #[serde(rename = "defaultRequestTTL")]
    default_request_ttl: Option<GoDuration>,
    #[serde(rename = "noEndpointRequestTTL")]
    no_endpoint_request_ttl: Option<GoDuration>,
    default_priority_band: Option<BandSpec>,
    default_negative_priority_band: Option<BandSpec>,
    #[serde(default)]
    priority_bands: Vec<BandSpec>,
    /// Checked while reading: kvroute has no usage-limit policy.
    #[serde(
        default,
        rename = "usageLimitPolicyPluginRef",
        deserialize_with = "no_usage_limit_policy"
    )]
    _usage_limit_policy_plugin_ref: (),
    pub(crate) saturation_detector: Option<DetectorRef>,
    /// Checked while reading: kvroute never evicts a request it has routed.
    #[serde(default, rename = "enableEviction", deserialize_with = "no_eviction")]
    _enable_eviction: (),
}

/// One of `priorityBands` (or a default band's template, whose `priority` is not read).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BandSpec {
    #[serde(default)]
    priority: i32,
    max_bytes: Option<Quantity>,
    max_requests: Option<Quantity>,
    #[serde(
        default,
        rename = "fairnessPolicyRef",
        deserialize_with = "fairness_policy"
    )]
    _fairness_policy_ref: (),
    #[serde(
        default,
        rename = "orderingPolicyRef",
        deserialize_with = "ordering_policy"
    )]
    _ordering_policy_ref: (),
}

/// The `utilization-detector` plugin's parameters, checked as upstream checks them.
#[derive(Debug, Default)]
pub(crate) struct DetectorParams(pub(crate) UtilizationDetector);

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDetectorParams {
    queue_depth_threshold: Option<i64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<GoDuration>,
    headroom: Option<f64>,
    /// kvroute counts its own requests in flight; no producer is named or needed.
    #[serde(rename = "inFlightLoadProducerName")]
    _in_flight_load_producer_name: Option<IgnoredAny>,
}

impl<'de> Deserialize<'de> for DetectorParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawDetectorParams::deserialize(d)?;
        check_headroom(raw.headroom.unwrap_or(0.0)).map_err(de::Error::custom)?;
        UtilizationDetector::new(
            raw.queue_depth_threshold
                .unwrap_or(i64::from(DEFAULT_QUEUE_DEPTH_THRESHOLD)),
            raw.kv_cache_util_threshold
                .unwrap_or(DEFAULT_KV_CACHE_UTIL_THRESHOLD),
            raw.metrics_staleness_threshold
                .map_or(DEFAULT_METRICS_STALENESS, |d| d.0),
        )
        .map(Self)
        .map_err(de::Error::custom)
    }
}

impl FlowControlSpec {
    /// The queue's settings, upstream's defaults where nothing is said; two bands of one
    /// priority are refused.
    pub(crate) fn settings(&self) -> Result<FlowSettings, DuplicateBand> {
        let band = |b: Option<&BandSpec>| BandLimits {
            max_requests: b
                .and_then(|b| b.max_requests)
                .map(|q| q.0)
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_BAND_MAX_REQUESTS),
            max_bytes: b
                .and_then(|b| b.max_bytes)
                .map(|q| q.0)
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_BAND_MAX_BYTES),
        };
        let default_band = band(self.default_priority_band.as_ref());
        let mut bands = BTreeMap::new();
        for b in &self.priority_bands {
            if bands.insert(b.priority, band(Some(b))).is_some() {
                return Err(DuplicateBand(b.priority));
            }
        }
        let defaults = FlowSettings::default();
        // "0s" turns the TTL off; omitted, upstream's 60 s.
        let ttl = |d: Option<GoDuration>, default| match d {
            Some(GoDuration(d)) if d.is_zero() => None,
            Some(GoDuration(d)) => Some(d),
            None => default,
        };
        Ok(FlowSettings {
            max_requests: self.max_requests.map(|q| q.0).filter(|&n| n > 0),
            max_bytes: self.max_bytes.map(|q| q.0).filter(|&n| n > 0),
            ttl: ttl(self.default_request_ttl, defaults.ttl),
            no_endpoint_ttl: ttl(self.no_endpoint_request_ttl, defaults.no_endpoint_ttl),
            bands,
            default_band,
            negative_band: match &self.default_negative_priority_band {
                Some(b) => band(Some(b)),
                None => default_band,
            },
        })
    }
}

/// Two `priorityBands` entries with one priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DuplicateBand(pub(crate) i32);

/// A Kubernetes resource quantity as upstream writes counts and sizes: an integer, or a
/// string with a decimal (`k`, `M`, `G`, `T`, `P`, `E`) or binary (`Ki` … `Ei`) suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quantity(pub(crate) u64);

/// Parses a quantity; fractions are allowed where the suffix makes a whole number.
pub(crate) fn parse_quantity(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(at);
    let scale: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return Err(format!("{s:?} is not a quantity (a count, or 500M, 1Gi…)")),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a quantity (a count, or 500M, 1Gi…)"))?;
    let v = n * scale;
    if v.fract() != 0.0 || v >= u64::MAX as f64 {
        return Err(format!("{s:?} is not a whole number below 2^64"));
    }
    Ok(v as u64)
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity: a count, or a string such as \"1k\" or \"1Gi\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                u64::try_from(v)
                    .map(Quantity)
                    .map_err(|_| E::custom(format!("quantity {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                parse_quantity(v).map(Quantity).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as Go's `time.ParseDuration` writes it (`60s`, `200ms`, `1m30s`, `1.5h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GoDuration(pub(crate) Duration);

/// Parses a Go duration: one or more `<number><unit>`, units `ns`, `us`, `µs`, `ms`, `s`,
/// `m`, `h`; `0` alone is zero. Negative durations are refused.
pub(crate) fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as 60s, 200ms, 1m30s)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut secs = 0.0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let at = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(at);
        let n: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        secs += n * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_go_duration(&s)
            .map(GoDuration)
            .map_err(de::Error::custom)
    }
}

fn no_usage_limit_policy<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    let name = String::deserialize(d)?;
    if name.is_empty() {
        return Ok(());
    }
    Err(de::Error::custom(format!(
        "usageLimitPolicyPluginRef {name:?}: kvroute has no usage-limit policy (it dispatches while the pool is not saturated)"
    )))
}

fn no_eviction<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    if bool::deserialize(d)? {
        return Err(de::Error::custom(
            "enableEviction: kvroute never evicts a request it has routed",
        ));
    }
    Ok(())
}

fn only_policy<'de, D: Deserializer<'de>>(d: D, key: &str, known: &str) -> Result<(), D::Error> {
    let name = String::deserialize(d)?;
    if name == known {
        return Ok(());
    }
    Err(de::Error::custom(format!(
        "{key} {name:?}: kvroute applies {known} only"
    )))
}

fn fairness_policy<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    only_policy(d, "fairnessPolicyRef", FAIRNESS_POLICY)
}

fn ordering_policy<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    only_policy(d, "orderingPolicyRef", ORDERING_POLICY)
}

#[cfg(test)]
mod tests;
