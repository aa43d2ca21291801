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
use crate::plugins::active::{ActiveRequestScorer, NoHitLruScorer};
use crate::plugins::filters::{LabelSelectorFilter, RoleFilter, Selector};
use crate::plugins::handler::{
    AlwaysDisaggDecider, DisaggProfileHandler, PrefixBasedDecider, SingleProfileHandler,
    TtftPdDecider,
};
use crate::plugins::load::LoadScorer;
use crate::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use crate::plugins::pod_load::{LoadAwareScorer, LoraAffinityScorer, PodLoadScorer, Signal};
use crate::plugins::precise::{Speculative, TokenProducer};
use crate::plugins::replicate::{PrefixReplication, ReplicationPolicy};
use crate::plugins::session::{Role, SESSION_TOKEN_HEADER, SessionAffinity, Strategy};
use crate::plugins::ttft::TtftScorer;
use crate::{Plugin, SlotId};
use kvroute_core::BYTES_PER_TOKEN;

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
    DisaggProfileHandler => "disagg-profile-handler",
    PrefixBasedPdDecider => "prefix-based-pd-decider",
    AlwaysDisaggPdDecider => "always-disagg-pd-decider",
    TtftPdDecider => "ttft-pd-decider",
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
    SessionAffinityFilter => "session-affinity-filter",
    LoadScorer => "load-scorer",
    TtftScorer => "ttft-scorer",
    PrefixReplicationFilter => "prefix-replication-filter",
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
    indexer_config: Option<IndexerConfig>,
    /// Hold prompts as cached on the endpoint they were routed to until its events report
    /// them (default false, as upstream).
    speculative_indexing: Option<bool>,
    /// How long (a Go duration; default `2s`).
    #[serde(rename = "speculativeTTL")]
    speculative_ttl: Option<String>,
    prefix_match_info_producer_name: Option<String>,
}

/// Upstream's `indexerConfig`: kvroute reads the tier weights; the index backend and its
/// sizes are kvroute's own (the other fields are accepted and not read).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexerConfig {
    kv_cache_backend_configs: Option<Vec<BackendConfig>>,
}

/// One `kvCacheBackendConfigs` entry: the weight of a block held on a medium.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendConfig {
    name: String,
    weight: f64,
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

/// `prefix-replication-filter` (kvroute's).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ReplicationParams {
    /// Requests, each halved every `halfLife`, that make a prefix popular (default 4).
    min_requests: Option<f64>,
    /// Go duration (default `10s`).
    half_life: Option<String>,
    /// Go duration since a prefix was first matched before it is copied (default `2s`).
    min_age: Option<String>,
    /// Share of the smallest pod's KV cache the recent prefixes may take on average once
    /// copied (default 0.25).
    memory_share: Option<f64>,
    /// Pods a prefix is copied onto at most, counting the first (default 2).
    max_copies: Option<u64>,
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
    /// Count each endpoint's tokens at the speed learnt there when it is markedly slower
    /// (default true; false ranks every pod's tokens alike).
    learn_speed: Option<bool>,
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

/// `session-affinity-scorer` and `session-affinity-filter` (upstream gives both the same
/// parameters).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SessionParams {
    /// `encoded_endpoint_header` (default) or `session_id`.
    strategy: Option<String>,
    encoded_endpoint_header_config: Option<HeaderConfig>,
    /// The filter's header as upstream's earlier releases named it.
    header_name: Option<String>,
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

/// `disagg-profile-handler`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DisaggParams {
    /// `decode-first` (upstream's default, and the only order kvroute runs).
    stage_order: Option<String>,
    #[serde(default)]
    profiles: DisaggProfiles,
    #[serde(default)]
    deciders: DisaggDeciders,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisaggProfiles {
    decode: Option<String>,
    prefill: Option<String>,
    encode: Option<String>,
    fallback: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisaggDeciders {
    prefill: Option<String>,
    encode: Option<String>,
}

/// `prefix-based-pd-decider`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PdDeciderParams {
    /// Uncached prompt tokens from which the prompt is computed on a prefill pod (0, the
    /// default, turns disaggregation off).
    non_cached_tokens: Option<i64>,
    /// Shortest prompt that is disaggregated at all (0: any).
    prompt_tokens: Option<i64>,
}

/// `ttft-pd-decider` (kvroute's).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TtftPdParams {
    /// Uncached prompt tokens from which a prompt may move (default 2,048; 0 turns it off).
    non_cached_tokens: Option<i64>,
    /// How much later than on the decode pod itself the prefill pod may start the prompt
    /// (default 1.5).
    max_ttft_ratio: Option<f64>,
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
    Replication(ReplicationParams),
    LoadAware(LoadAwareParams),
    ActiveRequest(ActiveRequestParams),
    NoHitLru(NoHitLruParams),
    Token(#[allow(dead_code, reason = "read only to validate the YAML")] TokenProducerParams),
    Session(SessionParams),
    Disagg(DisaggParams),
    PdDecider(PdDeciderParams),
    TtftPd(TtftPdParams),
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
            T::PrefixReplicationFilter => Params::Replication(or_default(d)?),
            T::LoadAwareScorer => Params::LoadAware(or_default(d)?),
            T::ActiveRequestScorer => Params::ActiveRequest(or_default(d)?),
            T::NoHitLruScorer => Params::NoHitLru(or_default(d)?),
            T::TokenProducer => Params::Token(or_default(d)?),
            T::SessionAffinityScorer | T::SessionAffinityFilter => Params::Session(or_default(d)?),
            T::DisaggProfileHandler => Params::Disagg(or_default(d)?),
            T::PrefixBasedPdDecider => Params::PdDecider(or_default(d)?),
            T::TtftPdDecider => Params::TtftPd(or_default(d)?),
            T::UtilizationDetector => Params::Detector(or_default(d)?),
            T::SingleProfileHandler
            | T::AlwaysDisaggPdDecider
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
    own.map(|(_, p)| p)
        .ok_or_else(|| unavailable_for(name, t)("a producer cannot read another producer".into()))
}

/// `session-affinity-scorer` or `-filter` from its parameters: kvroute reads the two headers
/// upstream defaults to (others would need the ext_proc server to pass every header through).
fn session_affinity(
    p: &SessionParams,
    name: &str,
    t: PluginType,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let unavailable = unavailable_for(name, t);
    let strategy = match p.strategy.as_deref().unwrap_or("encoded_endpoint_header") {
        "encoded_endpoint_header" => Strategy::EncodedEndpoint,
        "session_id" => Strategy::SessionId,
        other => return Err(unavailable(format!("unknown strategy {other:?}"))),
    };
    if let Some(h) = p
        .encoded_endpoint_header_config
        .as_ref()
        .and_then(|c| c.header.as_deref())
        .into_iter()
        .chain(p.header_name.as_deref())
        .find(|h| !h.trim().eq_ignore_ascii_case(SESSION_TOKEN_HEADER))
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
    let role = if t == PluginType::SessionAffinityFilter {
        Role::Filter
    } else {
        Role::Scorer
    };
    Ok(Arc::new(SessionAffinity::new(role, strategy, ttl)))
}

/// Upstream's default `kvCacheBackendConfigs` (`pkg/kvcache/backend.go`) as kvroute's tiers
/// `[GPU, CPU, other]`: `gpu` 1.0; `cpu` and `lmcache-l1` (LMCache's host-memory tier) 0.8;
/// a medium with no entry counts 1.0 (upstream's `DefaultBackendWeight`).
pub(crate) const DEFAULT_TIER_WEIGHTS: [f64; 3] = [1.0, 0.8, 1.0];

/// The tier weights of a precise plugin's `indexerConfig.kvCacheBackendConfigs`, by medium
/// name as the events' `medium` maps to kvroute's tiers (`kvroute_events::Medium::tier`):
/// `gpu`, then `cpu` or `lmcache-l1`, then any other. Two names of one tier must agree.
fn tier_weights(p: &PreciseParams, name: &str, t: PluginType) -> Result<[f64; 3], ConfigError> {
    let unavailable = unavailable_for(name, t);
    let Some(backends) = p
        .indexer_config
        .as_ref()
        .and_then(|c| c.kv_cache_backend_configs.as_ref())
    else {
        return Ok(DEFAULT_TIER_WEIGHTS);
    };
    let mut weights = DEFAULT_TIER_WEIGHTS;
    let mut set: [Option<(&str, f64)>; 3] = [None; 3];
    for b in backends {
        if !(b.weight.is_finite() && b.weight >= 0.0) {
            return Err(unavailable(format!(
                "kvCacheBackendConfigs {:?}: weight {} is not a number of at least 0",
                b.name, b.weight
            )));
        }
        let medium = b.name.trim();
        let tier = if medium.eq_ignore_ascii_case("gpu") {
            0
        } else if medium.eq_ignore_ascii_case("cpu") || medium.eq_ignore_ascii_case("lmcache-l1") {
            1
        } else {
            2
        };
        if let Some((other, w)) = set[tier]
            && w != b.weight
        {
            return Err(unavailable(format!(
                "kvCacheBackendConfigs {other:?} ({w}) and {:?} ({}): kvroute indexes both media as one tier, give them one weight",
                b.name, b.weight
            )));
        }
        set[tier] = Some((medium, b.weight));
        weights[tier] = b.weight;
    }
    Ok(weights)
}

/// Upstream's `speculativeIndexing` / `speculativeTTL` of a precise producer.
fn speculative(
    p: &PreciseParams,
    name: &str,
    t: PluginType,
) -> Result<Option<Speculative>, ConfigError> {
    if !p.speculative_indexing.unwrap_or(false) {
        return Ok(None);
    }
    let ttl = go_duration(
        &unavailable_for(name, t),
        "speculativeTTL",
        &p.speculative_ttl,
        Duration::from_secs(2),
    )?;
    if ttl.is_zero() {
        return Err(unavailable_for(name, t)(
            "speculativeTTL must be positive".into(),
        ));
    }
    Ok(Some(Speculative::new(ttl)))
}

/// `prefix-replication-filter` from its parameters, each checked: a copy policy that could
/// never copy, or never forget, is refused.
fn replication(
    p: &ReplicationParams,
    name: &str,
    t: PluginType,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let unavailable = unavailable_for(name, t);
    let half_life = go_duration(
        &unavailable,
        "halfLife",
        &p.half_life,
        Duration::from_secs(10),
    )?;
    if half_life.is_zero() {
        return Err(unavailable("halfLife must be positive".into()));
    }
    let min_age = go_duration(&unavailable, "minAge", &p.min_age, Duration::from_secs(2))?;
    let min_requests = p.min_requests.unwrap_or(4.0);
    if !(min_requests.is_finite() && min_requests >= 1.0) {
        return Err(unavailable(format!(
            "minRequests {min_requests} is not a number of at least 1"
        )));
    }
    let memory_share = p.memory_share.unwrap_or(0.25);
    if !(memory_share > 0.0 && memory_share <= 1.0) {
        return Err(unavailable(format!(
            "memoryShare {memory_share} is not in (0, 1]"
        )));
    }
    let max_copies = p.max_copies.unwrap_or(2);
    if max_copies < 2 {
        return Err(unavailable(format!(
            "maxCopies {max_copies} is less than 2: nothing would be copied"
        )));
    }
    Ok(Arc::new(PrefixReplication::new(ReplicationPolicy {
        min_requests,
        half_life,
        min_age,
        memory_share,
        max_copies,
    })))
}

/// A plugin's Go duration parameter `what` (`text`, or `default` when not given); a value
/// that does not parse is refused through `unavailable`, naming the parameter and its text.
fn go_duration(
    unavailable: &impl Fn(String) -> ConfigError,
    what: &str,
    text: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        Some(text) => super::flow::parse_go_duration(text)
            .map_err(|e| unavailable(format!("{what} {text:?}: {e}"))),
        None => Ok(default),
    }
}

/// The error for plugin `name` of type `t` that cannot run as configured, for `reason`.
fn unavailable_for(name: &str, t: PluginType) -> impl Fn(String) -> ConfigError + '_ {
    move |reason| ConfigError::Unavailable {
        name: name.to_owned(),
        plugin_type: t.as_str(),
        reason,
    }
}

/// A token count parameter `what` (`default` when absent), refused when negative.
fn tokens(
    value: Option<i64>,
    default: i64,
    what: &str,
    unavailable: &dyn Fn(String) -> ConfigError,
) -> Result<u64, ConfigError> {
    let n = value.unwrap_or(default);
    u64::try_from(n).map_err(|_| unavailable(format!("{what} {n} is negative")))
}

/// `disagg-profile-handler` from its parameters: decode first, P/D when a prefill decider is
/// named; encode stages (multimodal) and the prefill-first order are refused, not ignored.
fn disagg_handler(
    p: &DisaggParams,
    name: &str,
    t: PluginType,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let unavailable = unavailable_for(name, t);
    if let Some(order) = &p.stage_order {
        let plain: String = order
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        if !matches!(plain.as_str(), "" | "decodefirst" | "decode") {
            return Err(unavailable(format!(
                "stageOrder {order:?}: kvroute runs decode-first"
            )));
        }
    }
    if let Some(d) = &p.deciders.encode {
        return Err(unavailable(format!(
            "deciders.encode {d:?}: kvroute has no encode stage (multimodal disaggregation)"
        )));
    }
    let decode = p.profiles.decode.clone().unwrap_or_else(|| "decode".into());
    let prefill = p
        .profiles
        .prefill
        .clone()
        .unwrap_or_else(|| "prefill".into());
    if let Some(f) = &p.profiles.fallback
        && (*f == decode || *f == prefill || p.profiles.encode.as_ref() == Some(f))
    {
        return Err(unavailable(format!(
            "profiles.fallback {f:?} must differ from the decode and prefill profiles"
        )));
    }
    Ok(Arc::new(DisaggProfileHandler::new(
        decode,
        prefill,
        p.deciders.prefill.clone(),
        p.profiles.fallback.clone(),
    )))
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
            let unavailable = unavailable_for(name, t);
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
                    return Err(unavailable(format!(
                        "matchLengthWeight {weight} is not in [0, 1]"
                    )));
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
            let weights = tier_weights(p, name, t)?;
            let own = match own_slot.filter(|_| named.is_none()) {
                Some(slot) => Some((
                    slot,
                    precise_producer(
                        ctx,
                        name,
                        t,
                        slot,
                        block_size,
                        weights,
                        speculative(p, name, t)?,
                    )?,
                )),
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
                return Err(unavailable_for(name, t)(format!(
                    "workWeight {work_weight} is not a number of at least 0"
                )));
            }
            Arc::new(TtftScorer::new(
                reads,
                work_weight,
                p.learn_speed.unwrap_or(true),
            ))
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
        (Params::Session(p), t) => session_affinity(p, name, t)?,
        (Params::Replication(p), t) => replication(p, name, t)?,
        (Params::Disagg(p), t) => disagg_handler(p, name, t)?,
        (Params::PdDecider(p), t) => {
            let unavailable = unavailable_for(name, t);
            let non_cached = tokens(p.non_cached_tokens, 0, "nonCachedTokens", &unavailable)?;
            let prompt = tokens(p.prompt_tokens, 0, "promptTokens", &unavailable)?;
            Arc::new(PrefixBasedDecider::new(non_cached, prompt))
        }
        (Params::None(_), T::AlwaysDisaggPdDecider) => Arc::new(AlwaysDisaggDecider),
        (Params::TtftPd(p), t) => {
            let unavailable = unavailable_for(name, t);
            let non_cached = tokens(p.non_cached_tokens, 2048, "nonCachedTokens", &unavailable)?;
            let ratio = p.max_ttft_ratio.unwrap_or(1.5);
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(unavailable(format!(
                    "maxTtftRatio {ratio} is not a positive number"
                )));
            }
            Arc::new(TtftPdDecider::new(non_cached, ratio))
        }
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
