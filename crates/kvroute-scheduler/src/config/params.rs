//! Plugin types, their parameters (upstream's names where the concept is the same), and how
//! each is built.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kvroute_index::DEFAULT_LRU_CAPACITY;
use kvroute_tokens::DEFAULT_CHUNK_BYTES;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::flow::DetectorParams;
use super::{BuildContext, ConfigError, approx_producer, precise_producer, prefix_scorer};
use crate::cycle::BYTES_PER_TOKEN;
use crate::plugins::active::{ActiveRequestScorer, NoHitLruScorer};
use crate::plugins::filters::{LabelSelectorFilter, RoleFilter, Selector};
use crate::plugins::handler::SingleProfileHandler;
use crate::plugins::load::LoadScorer;
use crate::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use crate::plugins::pod_load::{LoadAwareScorer, LoraAffinityScorer, PodLoadScorer, Signal};
use crate::plugins::precise::TokenProducer;
use crate::plugins::session::{SESSION_TOKEN_HEADER, SessionAffinityScorer, Strategy};
use crate::plugins::ttft::TtftScorer;
use crate::{Plugin, SlotId};

/// Upstream's default `maxPrefixTokensToMatch`.
const DEFAULT_MAX_PREFIX_TOKENS: usize = 131_072;

/// Most blocks a prompt is hashed into: bounds the work and memory a configuration can ask
/// of every request (1M tokens at 16 tokens a block).
const MAX_PREFIX_BLOCKS: usize = 65_536;

macro_rules! plugin_types {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// Every plugin type a configuration may name.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum PluginType { $($variant),* }

        impl PluginType {
            /// Every type, in the order `kvroute config types` lists them.
            pub const ALL: &[PluginType] = &[$(PluginType::$variant),*];

            /// The name a configuration writes.
            pub fn as_str(self) -> &'static str {
                match self { $(PluginType::$variant => $name),* }
            }

            fn from_name(name: &str) -> Option<Self> {
                match name { $($name => Some(PluginType::$variant),)* _ => None }
            }
        }
    };
}

plugin_types! {
    PrefixCacheScorer => "prefix-cache-scorer",
    PrecisePrefixCacheScorer => "precise-prefix-cache-scorer",
    ApproxPrefixCacheProducer => "approx-prefix-cache-producer",
    PrecisePrefixCacheProducer => "precise-prefix-cache-producer",
    MaxScorePicker => "max-score-picker",
    RandomPicker => "random-picker",
    WeightedRandomPicker => "weighted-random-picker",
    SingleProfileHandler => "single-profile-handler",
    LabelSelectorFilter => "label-selector-filter",
    PrefillFilter => "prefill-filter",
    DecodeFilter => "decode-filter",
    MetricsDataSource => "metrics-data-source",
    CoreMetricsExtractor => "core-metrics-extractor",
    QueueScorer => "queue-scorer",
    RunningRequestsSizeScorer => "running-requests-size-scorer",
    KvCacheUtilizationScorer => "kv-cache-utilization-scorer",
    LoadAwareScorer => "load-aware-scorer",
    LoraAffinityScorer => "lora-affinity-scorer",
    ActiveRequestScorer => "active-request-scorer",
    NoHitLruScorer => "no-hit-lru-scorer",
    TokenProducer => "token-producer",
    SessionAffinityScorer => "session-affinity-scorer",
    LoadScorer => "load-scorer",
    TtftScorer => "ttft-scorer",
    UtilizationDetector => "utilization-detector",
}

impl PluginType {
    /// Whether a plugin of this type fills a prefix slot of its own.
    pub(crate) fn produces_prefix(self) -> bool {
        matches!(
            self,
            Self::PrefixCacheScorer
                | Self::PrecisePrefixCacheScorer
                | Self::ApproxPrefixCacheProducer
                | Self::PrecisePrefixCacheProducer
        )
    }
}

impl fmt::Display for PluginType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PluginType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        PluginType::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = PluginType::ALL.iter().map(|t| t.as_str()).collect();
            de::Error::custom(format!(
                "unknown plugin type {name:?} (kvroute knows {})",
                known.join(", ")
            ))
        })
    }
}

/// One entry of `plugins`.
#[derive(Debug)]
pub(crate) struct PluginSpec {
    pub(crate) plugin_type: PluginType,
    name: Option<String>,
    pub(crate) params: Params,
}

impl PluginSpec {
    /// The plugin's name: as given, else its type's.
    pub(crate) fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.plugin_type.as_str())
    }
}

/// Upstream's approximate prefix parameters (`prefix-cache-scorer`,
/// `approx-prefix-cache-producer`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ApproxParams {
    /// Tokens per block (kvroute hashes `4 ×` as many bytes of text): upstream's default 16.
    block_size_tokens: Option<usize>,
    /// The deprecated name of `blockSizeTokens`.
    block_size: Option<usize>,
    max_prefix_blocks_to_match: Option<usize>,
    max_prefix_tokens_to_match: Option<usize>,
    lru_capacity_per_server: Option<usize>,
    /// Size each endpoint's LRU from the KV capacity its pod reports (`true` unless set),
    /// `lruCapacityPerServer` until it does.
    auto_tune: Option<bool>,
    /// Read another producer's matches instead of producing them.
    prefix_match_info_producer_name: Option<String>,
    match_length_weight: Option<f64>,
    match_length_scale_tokens: Option<usize>,
}

/// Upstream's precise producer parameters; kvroute takes the events' address, the tokenizers
/// and the block size from its flags, and checks the block size given here against them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PreciseParams {
    token_processor_config: Option<TokenProcessorConfig>,
    /// Where events come from and how blocks are indexed: kvroute's flags
    /// (`--kv-events-port`, `--kv-replay-port`) say, so these are accepted and not read.
    #[serde(rename = "kvEventsConfig")]
    _kv_events_config: Option<de::IgnoredAny>,
    #[serde(rename = "indexerConfig")]
    _indexer_config: Option<de::IgnoredAny>,
    #[serde(rename = "speculativeIndexing")]
    _speculative_indexing: Option<bool>,
    #[serde(rename = "speculativeTTL")]
    _speculative_ttl: Option<String>,
    prefix_match_info_producer_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenProcessorConfig {
    block_size: Option<usize>,
    block_size_tokens: Option<usize>,
    /// The engine's hash seed: kvroute keys its index by its own hash of the events' token
    /// ids, so it needs none.
    #[serde(rename = "hashSeed")]
    _hash_seed: Option<de::IgnoredAny>,
}

/// Pickers' parameter.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PickerParams {
    max_num_of_endpoints: Option<usize>,
}

/// `label-selector-filter`: a Kubernetes label selector.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LabelSelectorParams {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Selector>,
}

/// `metrics-data-source`: where the pods' metrics are read.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct MetricsSourceParams {
    pub(crate) scheme: Option<String>,
    pub(crate) path: Option<String>,
    #[serde(rename = "insecureSkipVerify")]
    _insecure_skip_verify: Option<bool>,
}

/// `core-metrics-extractor`: which engine's metric names the pods use; kvroute reads both
/// vLLM's and SGLang's.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ExtractorParams {
    #[serde(rename = "defaultEngine")]
    _default_engine: Option<String>,
    #[serde(rename = "engineConfigs")]
    _engine_configs: Option<de::IgnoredAny>,
    #[serde(rename = "engineLabelKey")]
    _engine_label_key: Option<String>,
}

/// `load-scorer` (kvroute's).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LoadParams {
    /// In-flight spread that counts in full (default 8).
    headroom: Option<usize>,
}

/// `ttft-scorer` (kvroute's).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TtftParams {
    /// Prefix producers whose matches count (default: all).
    #[serde(default)]
    producers: Vec<String>,
    /// Extra weight of the prefill work this request adds, over its own wait (default 0).
    work_weight: Option<f64>,
}

/// `load-aware-scorer`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LoadAwareParams {
    /// Waiting requests at which the score reaches 0 (default 128).
    threshold: Option<i64>,
}

/// `active-request-scorer`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ActiveRequestParams {
    /// Deprecated upstream and ignored there too: requests end with their stream.
    #[serde(rename = "requestTimeout")]
    _request_timeout: Option<String>,
    idle_threshold: Option<i64>,
    max_busy_score: Option<f64>,
    /// kvroute counts its own in-flight requests; no producer is needed or named.
    #[serde(rename = "inFlightLoadProducerName")]
    _in_flight_load_producer_name: Option<String>,
}

/// `no-hit-lru-scorer`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NoHitLruParams {
    lru_size: Option<i64>,
    prefix_match_info_producer_name: Option<String>,
    /// Deprecated upstream, never used there.
    #[serde(rename = "prefixPluginType")]
    _prefix_plugin_type: Option<String>,
    #[serde(rename = "prefixPluginName")]
    _prefix_plugin_name: Option<String>,
}

/// `token-producer`: upstream tokenizes by estimate, by asking a pod (`vllm`) or over a
/// socket; kvroute tokenizes with the tokenizers it loaded, which gives the pod's ids, so
/// these are accepted and not read.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TokenProducerParams {
    #[serde(rename = "modelName")]
    _model_name: Option<String>,
    #[serde(rename = "vllm")]
    _vllm: Option<de::IgnoredAny>,
    #[serde(rename = "estimate")]
    _estimate: Option<de::IgnoredAny>,
    #[serde(rename = "udsTokenizerConfig")]
    _uds_tokenizer_config: Option<de::IgnoredAny>,
}

/// `session-affinity-scorer`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SessionParams {
    /// `encoded_endpoint_header` (default) or `session_id`.
    strategy: Option<String>,
    encoded_endpoint_header_config: Option<HeaderConfig>,
    session_id_config: Option<SessionIdConfig>,
    /// Upstream names the profile whose pick the token carries; kvroute has one profile
    /// running per request.
    #[serde(rename = "profileName")]
    _profile_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderConfig {
    header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SessionIdConfig {
    #[serde(default)]
    sources: Vec<SessionSource>,
    eviction_ttl_seconds: Option<f64>,
    /// kvroute sweeps expired sessions when its table is full instead of on a timer.
    #[serde(rename = "evictionSweepSeconds")]
    _eviction_sweep_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SessionSource {
    header: Option<String>,
    attribute: Option<String>,
    #[serde(rename = "producer")]
    _producer: Option<String>,
}

/// A plugin type without parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// One plugin's parameters, read as its type defines them.
#[derive(Debug)]
pub(crate) enum Params {
    Approx(ApproxParams),
    Precise(PreciseParams),
    Picker(PickerParams),
    LabelSelector(LabelSelectorParams),
    MetricsDataSource(MetricsSourceParams),
    Extractor(#[allow(dead_code, reason = "read only to validate the YAML")] ExtractorParams),
    Load(LoadParams),
    Ttft(TtftParams),
    LoadAware(LoadAwareParams),
    ActiveRequest(ActiveRequestParams),
    NoHitLru(NoHitLruParams),
    Token(#[allow(dead_code, reason = "read only to validate the YAML")] TokenProducerParams),
    Session(SessionParams),
    Detector(DetectorParams),
    None(NoParams),
}

/// Reads the parameters of a plugin of type `.0`.
struct ParamsSeed(PluginType);

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Params, D::Error> {
        fn or_default<'de, T: Deserialize<'de> + Default, D: Deserializer<'de>>(
            d: D,
        ) -> Result<T, D::Error> {
            Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
        }
        use PluginType as T;
        Ok(match self.0 {
            T::PrefixCacheScorer | T::ApproxPrefixCacheProducer => Params::Approx(or_default(d)?),
            T::PrecisePrefixCacheScorer | T::PrecisePrefixCacheProducer => {
                Params::Precise(or_default(d)?)
            }
            T::MaxScorePicker | T::RandomPicker | T::WeightedRandomPicker => {
                Params::Picker(or_default(d)?)
            }
            T::LabelSelectorFilter => Params::LabelSelector(or_default(d)?),
            T::MetricsDataSource => Params::MetricsDataSource(or_default(d)?),
            T::CoreMetricsExtractor => Params::Extractor(or_default(d)?),
            T::LoadScorer => Params::Load(or_default(d)?),
            T::TtftScorer => Params::Ttft(or_default(d)?),
            T::LoadAwareScorer => Params::LoadAware(or_default(d)?),
            T::ActiveRequestScorer => Params::ActiveRequest(or_default(d)?),
            T::NoHitLruScorer => Params::NoHitLru(or_default(d)?),
            T::TokenProducer => Params::Token(or_default(d)?),
            T::SessionAffinityScorer => Params::Session(or_default(d)?),
            T::UtilizationDetector => Params::Detector(or_default(d)?),
            T::SingleProfileHandler
            | T::PrefillFilter
            | T::DecodeFilter
            | T::QueueScorer
            | T::RunningRequestsSizeScorer
            | T::KvCacheUtilizationScorer
            | T::LoraAffinityScorer => Params::None(or_default(d)?),
        })
    }
}

impl<'de> Deserialize<'de> for PluginSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SpecVisitor)
    }
}

struct SpecVisitor;

impl<'de> Visitor<'de> for SpecVisitor {
    type Value = PluginSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a plugin: {type, name, parameters}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PluginSpec, A::Error> {
        let mut plugin_type: Option<PluginType> = None;
        let mut name: Option<String> = None;
        let mut params: Option<Params> = None;
        let mut early: Option<serde_yaml_ng::Value> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" => plugin_type = Some(map.next_value()?),
                "name" => name = Some(map.next_value()?),
                // Read as the type says while the parser knows where it is, so a wrong
                // parameter is reported with its line.
                "parameters" => match plugin_type {
                    Some(t) => params = Some(map.next_value_seed(ParamsSeed(t))?),
                    None => early = Some(map.next_value()?),
                },
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["type", "name", "parameters"],
                    ));
                }
            }
        }
        let plugin_type = plugin_type.ok_or_else(|| de::Error::missing_field("type"))?;
        let params = match (params, early) {
            (Some(p), _) => p,
            (None, Some(v)) => ParamsSeed(plugin_type)
                .deserialize(v)
                .map_err(|e| de::Error::custom(format!("{plugin_type} parameters: {e}")))?,
            (None, None) => ParamsSeed(plugin_type)
                .deserialize(serde_yaml_ng::Value::Null)
                .map_err(|e| de::Error::custom(format!("{plugin_type} parameters: {e}")))?,
        };
        Ok(PluginSpec {
            plugin_type,
            name,
            params,
        })
    }
}

/// A producer type's plugin: its own producer (it cannot read another's slot).
fn own_producer(
    own: Option<(SlotId, Arc<dyn Plugin>)>,
    name: &str,
    t: PluginType,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    own.map(|(_, p)| p).ok_or_else(|| ConfigError::Unavailable {
        name: name.to_owned(),
        plugin_type: t.as_str(),
        reason: "a producer cannot read another producer".into(),
    })
}

/// `session-affinity-scorer` from its parameters: kvroute reads the two headers upstream
/// defaults to (others would need the ext_proc server to pass every header through).
fn session_scorer(
    p: &SessionParams,
    name: &str,
    t: PluginType,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let unavailable = |reason: String| ConfigError::Unavailable {
        name: name.to_owned(),
        plugin_type: t.as_str(),
        reason,
    };
    let strategy = match p.strategy.as_deref().unwrap_or("encoded_endpoint_header") {
        "encoded_endpoint_header" => Strategy::EncodedEndpoint,
        "session_id" => Strategy::SessionId,
        other => return Err(unavailable(format!("unknown strategy {other:?}"))),
    };
    if let Some(h) = p
        .encoded_endpoint_header_config
        .as_ref()
        .and_then(|c| c.header.as_deref())
        .filter(|h| !h.trim().eq_ignore_ascii_case(SESSION_TOKEN_HEADER))
    {
        return Err(unavailable(format!(
            "header {h:?}: kvroute reads the session token from {SESSION_TOKEN_HEADER}"
        )));
    }
    let mut ttl = 300.0;
    if let Some(c) = &p.session_id_config {
        if let Some(s) = c.sources.iter().find(|s| {
            s.attribute.is_some()
                || s.header
                    .as_deref()
                    .is_some_and(|h| !h.trim().eq_ignore_ascii_case("x-session-id"))
        }) {
            return Err(unavailable(format!(
                "session source {:?}: kvroute reads the session id from x-session-id",
                s.header.as_deref().or(s.attribute.as_deref()).unwrap_or("")
            )));
        }
        ttl = c.eviction_ttl_seconds.unwrap_or(ttl);
    }
    let ttl = Duration::try_from_secs_f64(ttl)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            unavailable(format!(
                "evictionTtlSeconds {ttl} is not a positive duration"
            ))
        })?;
    Ok(Arc::new(SessionAffinityScorer::new(strategy, ttl)))
}

/// Builds the plugin `spec` describes.
pub(super) fn build(
    spec: &PluginSpec,
    ctx: &BuildContext,
    slots: &HashMap<&str, SlotId>,
    resolve: &dyn Fn(&str, &str) -> Result<SlotId, ConfigError>,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    use PluginType as T;
    let name = spec.name();
    let from = format!("plugin {name:?}");
    let own_slot = slots.get(name).copied();
    Ok(match (&spec.params, spec.plugin_type) {
        (Params::Approx(p), t) => {
            // Upstream's precedence: `blockSizeTokens`, else the deprecated `blockSize` (also
            // tokens); `maxPrefixTokensToMatch`, else the deprecated `maxPrefixBlocksToMatch`.
            let unavailable = |reason: String| ConfigError::Unavailable {
                name: name.to_owned(),
                plugin_type: t.as_str(),
                reason,
            };
            let tokens = p
                .block_size_tokens
                .or(p.block_size)
                .unwrap_or(DEFAULT_CHUNK_BYTES / BYTES_PER_TOKEN);
            if tokens == 0 {
                return Err(unavailable("blockSizeTokens must be at least 1".into()));
            }
            let chunk_bytes = tokens.saturating_mul(BYTES_PER_TOKEN);
            let max_blocks = match (p.max_prefix_tokens_to_match, p.max_prefix_blocks_to_match) {
                (Some(t), _) if t > 0 => (t / tokens).max(1),
                (_, Some(b)) if b > 0 => b,
                _ => DEFAULT_MAX_PREFIX_TOKENS / tokens,
            };
            if max_blocks > MAX_PREFIX_BLOCKS {
                return Err(unavailable(format!(
                    "{max_blocks} blocks to match is over kvroute's bound of {MAX_PREFIX_BLOCKS}"
                )));
            }
            let capacity = p.lru_capacity_per_server.unwrap_or(DEFAULT_LRU_CAPACITY);
            let named = p
                .prefix_match_info_producer_name
                .as_deref()
                .map(|n| resolve(&from, n))
                .transpose()?;
            let own = own_slot.filter(|_| named.is_none()).map(|slot| {
                (
                    slot,
                    approx_producer(
                        ctx,
                        name,
                        slot,
                        chunk_bytes,
                        max_blocks,
                        capacity,
                        p.auto_tune.unwrap_or(true),
                    ),
                )
            });
            if t == T::ApproxPrefixCacheProducer {
                own_producer(own, name, t)?
            } else {
                let weight = p.match_length_weight.unwrap_or(0.0);
                if !(0.0..=1.0).contains(&weight) {
                    return Err(ConfigError::Unavailable {
                        name: name.to_owned(),
                        plugin_type: t.as_str(),
                        reason: format!("matchLengthWeight {weight} is not in [0, 1]"),
                    });
                }
                let scale = p.match_length_scale_tokens.unwrap_or(8192).max(1);
                Arc::new(
                    prefix_scorer(t, name, own, named)?.with_match_length(weight, scale as f64),
                )
            }
        }
        (Params::Precise(p), t) => {
            let block_size = p
                .token_processor_config
                .as_ref()
                .and_then(|c| c.block_size.or(c.block_size_tokens));
            let named = p
                .prefix_match_info_producer_name
                .as_deref()
                .map(|n| resolve(&from, n))
                .transpose()?;
            let own = match own_slot.filter(|_| named.is_none()) {
                Some(slot) => Some((slot, precise_producer(ctx, name, t, slot, block_size)?)),
                None => None,
            };
            if t == T::PrecisePrefixCacheProducer {
                own_producer(own, name, t)?
            } else {
                Arc::new(prefix_scorer(t, name, own, named)?)
            }
        }
        (Params::Picker(p), t) => {
            let n = p.max_num_of_endpoints.unwrap_or(1);
            match t {
                T::RandomPicker => Arc::new(RandomPicker::new(n)),
                T::WeightedRandomPicker => Arc::new(WeightedRandomPicker::new(n)),
                _ => Arc::new(MaxScorePicker::new(n)),
            }
        }
        (Params::LabelSelector(p), _) => Arc::new(LabelSelectorFilter::new(
            p.match_labels.clone(),
            p.match_expressions.clone(),
        )),
        (Params::Load(p), _) => Arc::new(LoadScorer::new(
            p.headroom.unwrap_or(8),
            Some(ctx.staleness),
        )),
        (Params::Ttft(p), t) => {
            let reads = p
                .producers
                .iter()
                .map(|n| resolve(&from, n))
                .collect::<Result<Vec<_>, _>>()?;
            let work_weight = p.work_weight.unwrap_or(0.0);
            if !(work_weight.is_finite() && work_weight >= 0.0) {
                return Err(ConfigError::Unavailable {
                    name: name.to_owned(),
                    plugin_type: t.as_str(),
                    reason: format!("workWeight {work_weight} is not a number of at least 0"),
                });
            }
            Arc::new(TtftScorer::new(reads, work_weight))
        }
        (Params::MetricsDataSource(_) | Params::Extractor(_) | Params::Detector(_), t) => {
            Arc::new(crate::plugins::DataSource(t.as_str()))
        }
        (Params::None(_), T::PrefillFilter) => Arc::new(RoleFilter::prefill()),
        (Params::None(_), T::DecodeFilter) => Arc::new(RoleFilter::decode()),
        (Params::LoadAware(p), _) => {
            // Upstream's default for anything not positive.
            let threshold = p.threshold.filter(|&t| t > 0).unwrap_or(128);
            Arc::new(LoadAwareScorer::new(
                usize::try_from(threshold).unwrap_or(usize::MAX),
                ctx.staleness,
            ))
        }
        (Params::ActiveRequest(p), _) => {
            let idle = usize::try_from(p.idle_threshold.unwrap_or(0).max(0)).unwrap_or(0);
            let busy = p
                .max_busy_score
                .filter(|b| (0.0..=1.0).contains(b))
                .unwrap_or(1.0);
            Arc::new(ActiveRequestScorer::new(idle, busy))
        }
        (Params::NoHitLru(p), _) => {
            let reads = match &p.prefix_match_info_producer_name {
                Some(n) => vec![resolve(&from, n)?],
                None => Vec::new(),
            };
            let size = p.lru_size.filter(|&n| n > 0).unwrap_or(1024);
            Arc::new(NoHitLruScorer::new(
                reads,
                usize::try_from(size).unwrap_or(usize::MAX),
            ))
        }
        (Params::Token(_), _) => Arc::new(TokenProducer::new(ctx.tokenizers.clone())),
        (Params::Session(p), t) => session_scorer(p, name, t)?,
        (Params::None(_), T::LoraAffinityScorer) => {
            Arc::new(LoraAffinityScorer::new(ctx.staleness))
        }
        (Params::None(_), T::QueueScorer) => Arc::new(PodLoadScorer::new(
            spec.plugin_type.as_str(),
            Signal::Waiting,
            ctx.staleness,
        )),
        (Params::None(_), T::RunningRequestsSizeScorer) => Arc::new(PodLoadScorer::new(
            spec.plugin_type.as_str(),
            Signal::Running,
            ctx.staleness,
        )),
        (Params::None(_), T::KvCacheUtilizationScorer) => Arc::new(PodLoadScorer::new(
            spec.plugin_type.as_str(),
            Signal::KvUsage,
            ctx.staleness,
        )),
        (Params::None(_), _) => Arc::new(SingleProfileHandler),
    })
}
