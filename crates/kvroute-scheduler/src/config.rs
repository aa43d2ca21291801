//! `EndpointPickerConfig`: the YAML upstream's endpoint picker is configured with
//! (`apiVersion: llm-d.ai/v1alpha1`, or the older `inference.networking.x-k8s.io/v1alpha1`),
//! parsed and built into a [`Scheduler`].
//!
//! Parameters are read into typed structs while the YAML is parsed, so a wrong parameter is
//! reported with the plugin type and its line; an unknown plugin type is reported with its
//! line too. Plugins reference each other by name (a scorer's
//! `prefixMatchInfoProducerName`, kvroute's `ttft-scorer`'s `producers`).

mod params;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use kvroute_index::{ApproxIndex, PrefixIndex, Shared};
use serde::Deserialize;

pub use params::PluginType;
use params::{Params, PluginSpec};

use crate::framework::{Profile, Scheduler};
use crate::plugins::handler::SingleProfileHandler;
use crate::plugins::pickers::MaxScorePicker;
use crate::plugins::precise::{PreciseProducer, Tokenizers};
use crate::plugins::prefix::{ApproxProducer, PrefixScorer};
use crate::{Plugin, SlotId};

/// The API versions a configuration may declare.
pub const API_VERSIONS: [&str; 2] = [
    "llm-d.ai/v1alpha1",
    "inference.networking.x-k8s.io/v1alpha1",
];

/// kvroute's default configuration for a pool that publishes no KV events.
pub const DEFAULT_APPROX: &str = include_str!("../../../deploy/config/kvroute.yaml");
/// kvroute's default configuration for a pool that publishes KV events.
pub const DEFAULT_PRECISE: &str = include_str!("../../../deploy/config/kvroute-precise.yaml");
/// Fewest requests in flight, nothing else.
pub const LEAST_IN_FLIGHT: &str = include_str!("../../../deploy/config/least-in-flight.yaml");

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or not the shape of an `EndpointPickerConfig` (unknown plugin types and
    /// parameters among it); the message names the line.
    #[error(transparent)]
    Yaml(#[from] serde_yaml_ng::Error),
    /// An `apiVersion` this build does not read.
    #[error("apiVersion {0:?} is not one of {API_VERSIONS:?}")]
    ApiVersion(String),
    /// A `kind` other than `EndpointPickerConfig`.
    #[error("kind {0:?} is not EndpointPickerConfig")]
    Kind(String),
    /// Two plugins with one name.
    #[error("two plugins are named {0:?}")]
    DuplicateName(String),
    /// A reference to a plugin that is not configured.
    #[error("{from}: no plugin is named {name:?}")]
    UnknownRef {
        /// Where the reference is.
        from: String,
        /// The missing name.
        name: String,
    },
    /// A reference to a plugin that cannot play the role asked of it.
    #[error("{from}: plugin {name:?} ({plugin_type}) is not {role}")]
    WrongRole {
        /// Where the reference is.
        from: String,
        /// The plugin referenced.
        name: String,
        /// Its type.
        plugin_type: &'static str,
        /// The role it was asked to play.
        role: &'static str,
    },
    /// A profile listing two pickers.
    #[error("profile {0:?} lists more than one picker")]
    TwoPickers(String),
    /// Several profiles need a profile handler that chooses among them.
    #[error("{0} profiles, and single-profile-handler runs exactly one")]
    ProfilesForHandler(usize),
    /// Two profile handlers.
    #[error("more than one profile handler is configured")]
    TwoHandlers,
    /// A plugin whose type kvroute recognises but cannot run here.
    #[error("plugin {name:?} ({plugin_type}): {reason}")]
    Unavailable {
        /// The plugin's name.
        name: String,
        /// Its type.
        plugin_type: &'static str,
        /// Why.
        reason: String,
    },
}

/// A parsed configuration, before it is built.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPickerConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    feature_gates: FeatureGates,
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    scheduling_profiles: Vec<ProfileSpec>,
    /// Upstream's data layer, flow control, saturation detector, request handler and parser
    /// sections: read so that upstream's configurations load; kvroute's own flags configure
    /// what they configure upstream (`kvroute serve --help`).
    #[serde(default)]
    data_layer: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    flow_control: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    saturation_detector: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    request_handler: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    parser: Option<serde_yaml_ng::Value>,
}

/// Feature gates, as a list of names (`[flowControl]`, `gate=false` turns one off).
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
struct FeatureGates(Vec<String>);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProfileSpec {
    name: String,
    #[serde(default)]
    plugins: Vec<PluginRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PluginRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// An approximate index's producer name, capacity and TTL.
type ApproxKey = (String, usize, Option<u64>);

/// What building a scheduler needs from outside the configuration: the index the pods' KV
/// events keep, the tokenizers, the pool's block size; and the approximate indexes of a
/// previous build, kept across reloads so a new configuration does not start blind.
#[derive(Debug)]
pub struct BuildContext {
    /// The precise index, when the pods' KV events are followed.
    pub precise_index: Option<Arc<Shared<PrefixIndex>>>,
    /// Tokenizers for precise matching of text and chat prompts.
    pub tokenizers: Tokenizers,
    /// The pods' KV block size, in tokens.
    pub block_size: usize,
    /// A scrape of a pod's metrics older than this is not read (upstream's
    /// `--metrics-staleness-threshold`).
    pub staleness: std::time::Duration,
    approx: Mutex<HashMap<ApproxKey, Arc<Shared<ApproxIndex>>>>,
}

impl BuildContext {
    /// A context without KV events or tokenizers.
    pub fn new(block_size: usize) -> Self {
        Self {
            precise_index: None,
            tokenizers: Tokenizers::new(),
            block_size,
            staleness: std::time::Duration::from_secs(2),
            approx: Mutex::new(HashMap::new()),
        }
    }

    /// The approximate index of the producer `name` with these bounds: the one a previous
    /// build made if any, so that a reload keeps what was learnt.
    fn approx_index(
        &self,
        name: &str,
        capacity: usize,
        ttl_ms: Option<u64>,
    ) -> Arc<Shared<ApproxIndex>> {
        let mut cache = self.approx.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            cache
                .entry((name.to_owned(), capacity, ttl_ms))
                .or_insert_with(|| Arc::new(Shared::new(ApproxIndex::new(capacity, ttl_ms)))),
        )
    }

    /// Every approximate index built so far (for sizes).
    pub fn approx_indexes(&self) -> Vec<Arc<Shared<ApproxIndex>>> {
        let cache = self.approx.lock().unwrap_or_else(PoisonError::into_inner);
        cache.values().cloned().collect()
    }
}

impl EndpointPickerConfig {
    /// Parses a configuration; unknown plugin types, unknown parameters and wrong values
    /// are refused with their line.
    pub fn parse(yaml: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml_ng::from_str(yaml)?;
        if let Some(v) = &config.api_version
            && !API_VERSIONS.contains(&v.as_str())
        {
            return Err(ConfigError::ApiVersion(v.clone()));
        }
        if let Some(k) = &config.kind
            && k != "EndpointPickerConfig"
        {
            return Err(ConfigError::Kind(k.clone()));
        }
        Ok(config)
    }

    /// Whether feature gate `name` is on (`name` listed, and not as `name=false`).
    pub fn feature_gate(&self, name: &str) -> bool {
        self.feature_gates
            .0
            .iter()
            .any(|g| match g.split_once('=') {
                Some((n, v)) => n == name && v != "false",
                None => g == name,
            })
    }

    /// The plugins, by name, with their types.
    pub fn plugins(&self) -> impl Iterator<Item = (&str, PluginType)> {
        self.plugins.iter().map(|p| (p.name(), p.plugin_type))
    }

    /// The path of the pods' metrics endpoint if a `metrics-data-source` sets one.
    pub fn metrics_path(&self) -> Option<&str> {
        self.plugins.iter().find_map(|p| match &p.params {
            Params::MetricsDataSource(m) => m.path.as_deref(),
            _ => None,
        })
    }

    /// The scheme a `metrics-data-source` asks for, if one does.
    pub fn metrics_scheme(&self) -> Option<&str> {
        self.plugins.iter().find_map(|p| match &p.params {
            Params::MetricsDataSource(m) => m.scheme.as_deref(),
            _ => None,
        })
    }

    /// Sections of upstream's configuration that kvroute reads but configures elsewhere,
    /// for a log line.
    pub fn ignored_sections(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (name, present) in [
            ("dataLayer", self.data_layer.is_some()),
            ("flowControl", self.flow_control.is_some()),
            ("saturationDetector", self.saturation_detector.is_some()),
            ("requestHandler", self.request_handler.is_some()),
            ("parser", self.parser.is_some()),
        ] {
            if present {
                out.push(name);
            }
        }
        out
    }

    /// Builds the scheduler.
    pub fn build(&self, ctx: &BuildContext) -> Result<Scheduler, ConfigError> {
        let mut names = HashSet::new();
        for p in &self.plugins {
            if !names.insert(p.name()) {
                return Err(ConfigError::DuplicateName(p.name().to_owned()));
            }
        }
        // Prefix slots first: a slot per plugin that produces prefix matches, so references
        // resolve whatever the order of the list.
        let slots: HashMap<&str, SlotId> = self
            .plugins
            .iter()
            .filter(|p| p.plugin_type.produces_prefix())
            .enumerate()
            .map(|(i, p)| (p.name(), SlotId(i)))
            .collect();
        let resolve = |from: &str, name: &str| -> Result<SlotId, ConfigError> {
            if let Some(&s) = slots.get(name) {
                return Ok(s);
            }
            match self.plugins.iter().find(|p| p.name() == name) {
                Some(p) => Err(ConfigError::WrongRole {
                    from: from.to_owned(),
                    name: name.to_owned(),
                    plugin_type: p.plugin_type.as_str(),
                    role: "a prefix producer",
                }),
                None => Err(ConfigError::UnknownRef {
                    from: from.to_owned(),
                    name: name.to_owned(),
                }),
            }
        };
        let mut built: Vec<(String, Arc<dyn Plugin>)> = Vec::with_capacity(self.plugins.len());
        for spec in &self.plugins {
            let plugin = params::build(spec, ctx, &slots, &resolve)?;
            built.push((spec.name().to_owned(), plugin));
        }
        let find = |name: &str| built.iter().find(|(n, _)| n == name).map(|(_, p)| p);

        let mut handler: Option<Arc<dyn Plugin>> = None;
        for (_, p) in &built {
            if p.profile_handler().is_some() {
                if handler.is_some() {
                    return Err(ConfigError::TwoHandlers);
                }
                handler = Some(Arc::clone(p));
            }
        }

        let mut profiles = Vec::new();
        let specs: Vec<ProfileSpec>;
        let specs = if self.scheduling_profiles.is_empty() {
            // No profile: one, named "default", of every filter, scorer and picker.
            specs = vec![ProfileSpec {
                name: "default".into(),
                plugins: built
                    .iter()
                    .filter(|(_, p)| {
                        p.filter().is_some() || p.scorer().is_some() || p.picker().is_some()
                    })
                    .map(|(n, _)| PluginRef {
                        plugin_ref: n.clone(),
                        weight: None,
                    })
                    .collect(),
            }];
            &specs
        } else {
            &self.scheduling_profiles
        };
        let mut runs: HashSet<SlotId> = HashSet::new();
        let mut listed_producers: HashSet<String> = HashSet::new();
        for spec in specs {
            let from = format!("profile {:?}", spec.name);
            let mut filters = Vec::new();
            let mut scorers = Vec::new();
            let mut picker: Option<Arc<dyn Plugin>> = None;
            for r in &spec.plugins {
                let Some(p) = find(&r.plugin_ref) else {
                    return Err(ConfigError::UnknownRef {
                        from,
                        name: r.plugin_ref.clone(),
                    });
                };
                runs.extend(p.reads().iter().copied());
                if let Some(s) = p.writes() {
                    runs.insert(s);
                }
                if p.producer().is_some() {
                    listed_producers.insert(r.plugin_ref.clone());
                }
                if p.filter().is_some() {
                    filters.push(Arc::clone(p));
                }
                if p.scorer().is_some() {
                    // Upstream's default weight is 1.
                    scorers.push((Arc::clone(p), r.weight.unwrap_or(1.0)));
                }
                if p.picker().is_some() {
                    if picker.is_some() {
                        return Err(ConfigError::TwoPickers(spec.name.clone()));
                    }
                    picker = Some(Arc::clone(p));
                }
                if p.profile_handler().is_some() {
                    return Err(ConfigError::WrongRole {
                        from,
                        name: r.plugin_ref.clone(),
                        plugin_type: p.type_name(),
                        role: "a filter, scorer, picker or producer",
                    });
                }
            }
            profiles.push(Profile {
                name: spec.name.clone(),
                filters,
                scorers,
                // Upstream adds a max-score picker to a profile that names none.
                picker: picker.unwrap_or_else(|| Arc::new(MaxScorePicker::new(1))),
            });
        }
        let handler = match handler {
            Some(h) => h,
            None if profiles.len() == 1 => Arc::new(SingleProfileHandler),
            None => return Err(ConfigError::ProfilesForHandler(profiles.len())),
        };
        if profiles.len() != 1 && handler.type_name() == "single-profile-handler" {
            return Err(ConfigError::ProfilesForHandler(profiles.len()));
        }
        // Producers run when a profile lists them or reads what they write; the others (a
        // producer configured for a profile that is not used) cost nothing.
        let producers = built
            .iter()
            .filter(|(n, p)| {
                p.producer().is_some()
                    && (listed_producers.contains(n)
                        || p.writes().is_some_and(|s| runs.contains(&s)))
            })
            .map(|(_, p)| Arc::clone(p))
            .collect();
        Ok(Scheduler::new(
            built,
            producers,
            profiles,
            handler,
            slots.len(),
        ))
    }
}

/// Builds the approximate producer `name` with its parameters.
fn approx_producer(
    ctx: &BuildContext,
    name: &str,
    slot: SlotId,
    chunk_bytes: usize,
    max_blocks: usize,
    capacity: usize,
) -> Arc<dyn Plugin> {
    Arc::new(ApproxProducer::new(
        slot,
        chunk_bytes,
        max_blocks,
        ctx.approx_index(name, capacity, None),
    ))
}

/// Builds the precise producer `name`, which needs the index the KV events keep.
fn precise_producer(
    ctx: &BuildContext,
    name: &str,
    plugin_type: PluginType,
    slot: SlotId,
    block_size: Option<usize>,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let Some(index) = &ctx.precise_index else {
        return Err(ConfigError::Unavailable {
            name: name.to_owned(),
            plugin_type: plugin_type.as_str(),
            reason: "precise prefix matching needs the pods' KV events (--kv-events-port)".into(),
        });
    };
    if let Some(bs) = block_size
        && bs != ctx.block_size
    {
        return Err(ConfigError::Unavailable {
            name: name.to_owned(),
            plugin_type: plugin_type.as_str(),
            reason: format!(
                "block size {bs} differs from the pool's ({}, --block-size)",
                ctx.block_size
            ),
        });
    }
    Ok(Arc::new(PreciseProducer::new(
        slot,
        Arc::clone(index),
        ctx.block_size,
        [1.0, 0.8, 0.5],
        ctx.tokenizers.clone(),
    )))
}

/// A prefix scorer over its own producer, or over the one it names.
fn prefix_scorer(
    plugin_type: PluginType,
    own: Option<(SlotId, Arc<dyn Plugin>)>,
    named: Option<SlotId>,
) -> PrefixScorer {
    match (named, own) {
        (Some(slot), _) => PrefixScorer::new(plugin_type.as_str(), slot, None),
        (None, Some((slot, p))) => PrefixScorer::new(plugin_type.as_str(), slot, Some(p)),
        // No slot of its own and none named: reads a slot nobody fills, so it scores 0.
        (None, None) => PrefixScorer::new(plugin_type.as_str(), SlotId(usize::MAX), None),
    }
}

#[cfg(test)]
mod tests;
