//! `EndpointPickerConfig`: the YAML upstream's endpoint picker is configured with
//! (`apiVersion: llm-d.ai/v1alpha1`, or the older `inference.networking.x-k8s.io/v1alpha1`),
//! parsed and built into a [`Scheduler`].
//!
//! Parameters are read into typed structs while the YAML is parsed, so a wrong parameter is
//! reported with the plugin type and its line; an unknown plugin type is reported with its
//! line too. Plugins reference each other by name (a scorer's
//! `prefixMatchInfoProducerName`, kvroute's `ttft-scorer`'s `producers`).

mod flow;
mod params;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use kvroute_index::{ApproxIndex, PrefixIndex, Shared};
use serde::Deserialize;

use flow::{DetectorRef, FlowControlSpec};
pub use params::PluginType;
use params::{Params, PluginSpec};

use crate::admission::{AdmissionSettings, UtilizationDetector};
use crate::framework::{PrefillStage, Profile, Scheduler};
use crate::plugins::handler::SingleProfileHandler;
use crate::plugins::pickers::MaxScorePicker;
use crate::plugins::precise::{PreciseProducer, Speculative, Tokenizers};
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
/// kvroute's configuration for a pool split into prefill and decode pods.
pub const DEFAULT_PD: &str = include_str!("../../../deploy/config/kvroute-pd.yaml");
/// Fewest requests in flight, nothing else.
pub const LEAST_IN_FLIGHT: &str = include_str!("../../../deploy/config/least-in-flight.yaml");

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or not the shape of an `EndpointPickerConfig` (unknown plugin types and
    /// parameters among it); the message names the line.
    #[error(transparent)]
    Yaml(#[from] serde_yaml_ng::Error),
    /// An error found while building, with the line of what it names.
    #[error("line {line}: {error}")]
    At {
        /// 1-based line of the plugin or reference.
        line: usize,
        /// What is wrong there.
        error: Box<ConfigError>,
    },
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
    /// A weight that is negative or not a number.
    #[error(
        "profile {profile:?}: plugin {plugin:?} has weight {weight}; weights are finite and not negative"
    )]
    Weight {
        /// The profile.
        profile: String,
        /// The plugin reference.
        plugin: String,
        /// The weight given.
        weight: f64,
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
    /// A profile handler names a profile the configuration does not define.
    #[error("{handler} needs a scheduling profile named {profile:?} (its {role} profile)")]
    MissingProfile {
        /// The handler's type.
        handler: &'static str,
        /// The profile it names.
        profile: String,
        /// What it would run it for.
        role: &'static str,
    },
    /// Two `flowControl.priorityBands` of one priority.
    #[error("flowControl: two priority bands have priority {0}")]
    DuplicateBand(i32),
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
    /// The flow-control layer (acted on with the `flowControl` gate) and the saturation
    /// detector it and admission use (here, or at the top level as upstream's deprecated
    /// form).
    #[serde(default)]
    flow_control: Option<FlowControlSpec>,
    #[serde(default)]
    saturation_detector: Option<DetectorRef>,
    /// Upstream's data layer, request handler and parser sections: read so that upstream's
    /// configurations load; kvroute's own flags configure what they configure upstream
    /// (`kvroute serve --help`).
    #[serde(default)]
    data_layer: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    request_handler: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    parser: Option<serde_yaml_ng::Value>,
}

/// Feature gates, as a list of names (`[flowControl]`, `gate=false` turns one off).
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
struct FeatureGates(Vec<FeatureGate>);

/// Upstream's registered gates, and the Inference Extension's older `dataLayer`; kvroute
/// acts on `flowControl` (HA is another issue), and refuses other names as upstream does.
const FEATURE_GATES: [&str; 3] = ["flowControl", "haPopulateNonLeaderDatastore", "dataLayer"];

/// One gate, checked while the YAML is read so that an unknown one is refused with its line.
#[derive(Debug)]
struct FeatureGate {
    name: String,
    on: bool,
}

impl<'de> Deserialize<'de> for FeatureGate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (name, on) = match text.split_once('=') {
            Some((n, v)) => (n, v != "false"),
            None => (text.as_str(), true),
        };
        if !FEATURE_GATES.contains(&name) {
            return Err(serde::de::Error::custom(format!(
                "unknown feature gate {name:?} (known: {})",
                FEATURE_GATES.join(", ")
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            on,
        })
    }
}

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

/// What makes one approximate index reusable by another build: its producer's name, and
/// everything that decides its hashes and its bounds (chunk bytes, blocks hashed, capacity).
type ApproxKey = (String, usize, usize, usize);

/// What building a scheduler needs from outside the configuration: the index the pods' KV
/// events keep, the tokenizers, the pool's block size; and the approximate indexes the
/// running scheduler uses, found again by a reload so a new configuration does not start
/// blind. It holds them weakly: an index no scheduler uses any more is freed with the last
/// one that did, so a configuration changed back and forth never revives one that missed
/// endpoint changes meanwhile.
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
    approx: Mutex<HashMap<ApproxKey, Weak<Shared<ApproxIndex>>>>,
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

    /// The approximate index of the producer `name` with these settings: the one the running
    /// scheduler uses if any, so that a reload keeps what was learnt.
    fn approx_index(&self, key: ApproxKey) -> Arc<Shared<ApproxIndex>> {
        let mut cache = self.approx.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = cache.get(&key).and_then(Weak::upgrade) {
            return index;
        }
        cache.retain(|_, w| w.strong_count() > 0);
        let index = Arc::new(Shared::new(ApproxIndex::new(key.3, None)));
        cache.insert(key, Arc::downgrade(&index));
        index
    }

    /// Every approximate index in use (for sizes).
    pub fn approx_indexes(&self) -> Vec<Arc<Shared<ApproxIndex>>> {
        let cache = self.approx.lock().unwrap_or_else(PoisonError::into_inner);
        cache.values().filter_map(Weak::upgrade).collect()
    }
}

impl ConfigError {
    /// The line of `yaml` where the plugin or reference this error names is written.
    fn line_in(&self, yaml: &str) -> Option<usize> {
        let find = |keys: &[&str], value: &str| {
            yaml.lines().position(|l| {
                keys.iter().any(|k| {
                    [
                        format!("{k}: {value}"),
                        format!("{k}: \"{value}\""),
                        format!("{k}: '{value}'"),
                    ]
                    .iter()
                    .any(|p| {
                        l.contains(p.as_str())
                            && l[l.find(p.as_str()).unwrap_or(0) + p.len()..]
                                .chars()
                                .next()
                                .is_none_or(|c| matches!(c, ' ' | ',' | '}' | '#' | '\r'))
                    })
                })
            })
        };
        let line = match self {
            Self::UnknownRef { name, .. } => find(
                &["pluginRef", "prefixMatchInfoProducerName", "prefill"],
                name,
            )
            .or_else(|| find(&["-", "producers"], name)),
            Self::WrongRole { name, .. } | Self::Unavailable { name, .. } => {
                find(&["name"], name).or_else(|| find(&["type"], name))
            }
            Self::Weight { plugin, .. } => find(&["pluginRef"], plugin),
            Self::DuplicateName(name) => {
                let mut lines = yaml.lines().enumerate().filter(|(_, l)| {
                    l.contains(&format!("name: {name}")) || l.contains(&format!("type: {name}"))
                });
                lines.nth(1).map(|(i, _)| i)
            }
            Self::TwoPickers(profile) => find(&["name"], profile),
            Self::DuplicateBand(priority) => {
                let mut lines = yaml.lines().enumerate().filter(|(_, l)| {
                    let l = l.trim_start().trim_start_matches("- ");
                    l.strip_prefix("priority:")
                        .is_some_and(|v| v.trim() == priority.to_string())
                });
                lines.nth(1).map(|(i, _)| i)
            }
            _ => None,
        };
        line.map(|i| i + 1)
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

    /// The feature gates turned on.
    pub fn feature_gates(&self) -> impl Iterator<Item = &str> {
        self.feature_gates
            .0
            .iter()
            .filter(|g| g.on)
            .map(|g| g.name.as_str())
    }

    /// Parses `yaml` and builds it; an error found while building is given the line of the
    /// plugin or reference it names, where the text shows one.
    pub fn load(yaml: &str, ctx: &BuildContext) -> Result<Scheduler, ConfigError> {
        Self::parse(yaml)?.build_from(yaml, ctx)
    }

    /// [`Self::build`], giving an error the line of `yaml` (the text this configuration was
    /// parsed from) where what it names is written.
    pub fn build_from(&self, yaml: &str, ctx: &BuildContext) -> Result<Scheduler, ConfigError> {
        self.build(ctx).map_err(|e| match e.line_in(yaml) {
            Some(line) => ConfigError::At {
                line,
                error: Box::new(e),
            },
            None => e,
        })
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

    /// Sections of upstream's configuration that kvroute reads but does not act on (it
    /// configures them with its flags, or, for `flowControl`, the gate is off), for a log
    /// line.
    pub fn ignored_sections(&self) -> Vec<&'static str> {
        let flow_off = !self.feature_gates().any(|g| g == "flowControl");
        let mut out = Vec::new();
        for (name, present) in [
            ("dataLayer", self.data_layer.is_some()),
            ("flowControl", self.flow_control.is_some() && flow_off),
            ("requestHandler", self.request_handler.is_some()),
            ("parser", self.parser.is_some()),
        ] {
            if present {
                out.push(name);
            }
        }
        out
    }

    /// How requests are admitted: the saturation detector `flowControl.saturationDetector`
    /// (else the deprecated top-level `saturationDetector`) names, else a plugin named
    /// `utilization-detector`, else upstream's defaults; with the `flowControl` gate, the
    /// queue's settings.
    pub fn admission(&self) -> Result<AdmissionSettings, ConfigError> {
        let named = self
            .flow_control
            .as_ref()
            .and_then(|f| f.saturation_detector.as_ref())
            .or(self.saturation_detector.as_ref())
            .and_then(|r| r.plugin_ref.as_deref());
        let detector = match named {
            Some(name) => match self.plugins.iter().find(|p| p.name() == name) {
                Some(PluginSpec {
                    params: Params::Detector(d),
                    ..
                }) => d.0,
                Some(p) => {
                    return Err(ConfigError::WrongRole {
                        from: "saturationDetector".into(),
                        name: name.to_owned(),
                        plugin_type: p.plugin_type.as_str(),
                        role: "a saturation detector",
                    });
                }
                None => {
                    return Err(ConfigError::UnknownRef {
                        from: "saturationDetector".into(),
                        name: name.to_owned(),
                    });
                }
            },
            None => self
                .plugins
                .iter()
                .find_map(|p| match &p.params {
                    Params::Detector(d) if p.name() == PluginType::UtilizationDetector.as_str() => {
                        Some(d.0)
                    }
                    _ => None,
                })
                .unwrap_or_else(UtilizationDetector::default),
        };
        let flow = if self.feature_gates().any(|g| g == "flowControl") {
            let spec = self.flow_control.as_ref();
            Some(
                spec.map(FlowControlSpec::settings)
                    .transpose()
                    .map_err(|d| ConfigError::DuplicateBand(d.0))?
                    .unwrap_or_default(),
            )
        } else {
            None
        };
        Ok(AdmissionSettings { detector, flow })
    }

    /// [`Self::admission`], giving an error the line of `yaml` where what it names is
    /// written.
    pub fn admission_from(&self, yaml: &str) -> Result<AdmissionSettings, ConfigError> {
        self.admission().map_err(|e| match e.line_in(yaml) {
            Some(line) => ConfigError::At {
                line,
                error: Box::new(e),
            },
            None => e,
        })
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
                    let weight = r.weight.unwrap_or(1.0);
                    if !weight.is_finite() || weight < 0.0 {
                        return Err(ConfigError::Weight {
                            profile: spec.name.clone(),
                            plugin: r.plugin_ref.clone(),
                            weight,
                        });
                    }
                    scorers.push((Arc::clone(p), weight));
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
        let by_name = |wanted: &str, role: &'static str| {
            profiles
                .iter()
                .position(|p| p.name == wanted)
                .ok_or_else(|| ConfigError::MissingProfile {
                    handler: handler.type_name(),
                    profile: wanted.to_owned(),
                    role,
                })
        };
        let stage = match handler.profile_handler() {
            Some(h) => {
                if let Some(primary) = h.primary_profile() {
                    by_name(primary, "primary")?;
                }
                match h.prefill_stage() {
                    Some(names) => {
                        let decider = match find(names.decider) {
                            Some(d) if d.decider().is_some() => Arc::clone(d),
                            Some(d) => {
                                return Err(ConfigError::WrongRole {
                                    from: format!("plugin {:?}", handler.type_name()),
                                    name: names.decider.to_owned(),
                                    plugin_type: d.type_name(),
                                    role: "a decider",
                                });
                            }
                            None => {
                                return Err(ConfigError::UnknownRef {
                                    from: format!("plugin {:?}", handler.type_name()),
                                    name: names.decider.to_owned(),
                                });
                            }
                        };
                        Some(PrefillStage {
                            profile: by_name(names.profile, "prefill")?,
                            decider,
                            fallback: names.fallback.map(|f| by_name(f, "fallback")).transpose()?,
                        })
                    }
                    None => None,
                }
            }
            None => None,
        };
        let scheduler = Scheduler::new(built, producers, profiles, handler, slots.len());
        Ok(match stage {
            Some(stage) => scheduler.with_prefill_stage(stage),
            None => scheduler,
        })
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
    auto_tune: bool,
) -> Arc<dyn Plugin> {
    Arc::new(ApproxProducer::new(
        slot,
        chunk_bytes,
        max_blocks,
        ctx.approx_index((name.to_owned(), chunk_bytes, max_blocks, capacity)),
        capacity,
        auto_tune,
    ))
}

/// Builds the precise producer `name`, which needs the index the KV events keep.
fn precise_producer(
    ctx: &BuildContext,
    name: &str,
    plugin_type: PluginType,
    slot: SlotId,
    block_size: Option<usize>,
    tier_weights: [f64; 3],
    speculative: Option<Speculative>,
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
        tier_weights,
        ctx.tokenizers.clone(),
        speculative,
    )))
}

/// A prefix scorer over its own producer, or over the one it names.
fn prefix_scorer(
    plugin_type: PluginType,
    name: &str,
    own: Option<(SlotId, Arc<dyn Plugin>)>,
    named: Option<SlotId>,
) -> Result<PrefixScorer, ConfigError> {
    match (named, own) {
        (Some(slot), _) => Ok(PrefixScorer::new(plugin_type.as_str(), slot, None)),
        (None, Some((slot, p))) => Ok(PrefixScorer::new(plugin_type.as_str(), slot, Some(p))),
        // A prefix type always has a slot of its own; refused rather than read a wrong one.
        (None, None) => Err(ConfigError::Unavailable {
            name: name.to_owned(),
            plugin_type: plugin_type.as_str(),
            reason: "no prefix producer to read".into(),
        }),
    }
}

#[cfg(test)]
mod tests;
