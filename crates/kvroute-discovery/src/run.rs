//! The watch loops: the pool, its pods and the objectives, each a kube-runtime `watcher`
//! with default backoff into a reflector `Store`; the pods' store becomes the registry's
//! endpoint list after every change.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_fn};
use kube::{Client, Resource};
use kvroute_endpoints::Registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::crd::{ObjectiveSpec, objective, objective_x, v1, v1alpha2};
use crate::{DiscoveryError, PoolSpec, endpoints};

/// Which API group (and so which shape) the pool is read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolGroup {
    /// `inference.networking.k8s.io/v1`, upstream's default.
    V1,
    /// `inference.networking.x-k8s.io/v1alpha2`.
    V1Alpha2,
}

impl FromStr for PoolGroup {
    type Err = DiscoveryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inference.networking.k8s.io" => Ok(Self::V1),
            "inference.networking.x-k8s.io" => Ok(Self::V1Alpha2),
            other => Err(DiscoveryError::Group(other.to_owned())),
        }
    }
}

/// What decides which pods are endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An `InferencePool` in the namespace, followed as it changes.
    Pool {
        /// Its `metadata.name`.
        name: String,
        /// Its API group.
        group: PoolGroup,
    },
    /// A fixed selector and ports (upstream's `--endpoint-selector`), for pods without a pool.
    Selector(PoolSpec),
}

/// Discovery's counters, registered under the caller's prefix (`kvroute_`).
#[derive(Clone, Debug, Default)]
pub struct DiscoveryMetrics {
    errors: Family<[(&'static str, &'static str); 1], Counter>,
    relists: Family<[(&'static str, &'static str); 1], Counter>,
    objectives: Gauge,
}

impl DiscoveryMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "discovery_errors",
            "Failed list or watch calls to the Kubernetes API server, by resource (pool, pods, objectives); each is retried with backoff",
            m.errors.clone(),
        );
        registry.register(
            "discovery_relists",
            "Full lists of a resource completed (the first, and one after each watch that expired), by resource",
            m.relists.clone(),
        );
        registry.register(
            "inference_objectives",
            "InferenceObjectives that apply to the pool",
            m.objectives.clone(),
        );
        m
    }

    fn error(&self, resource: &'static str) {
        self.errors.get_or_create(&[("resource", resource)]).inc();
    }

    fn relist(&self, resource: &'static str) {
        self.relists.get_or_create(&[("resource", resource)]).inc();
    }
}

/// The priorities of the `InferenceObjective`s that apply to the pool, by objective name
/// (what a request's objective header names); empty while their CRD is not installed.
#[derive(Clone, Debug, Default)]
pub struct Objectives(Arc<RwLock<[HashMap<String, i32>; 2]>>);

impl Objectives {
    /// The objective's priority (unset reads as 0, as upstream reads it); None when no such
    /// objective applies to the pool. `llm-d.ai` wins over the older group.
    pub fn priority(&self, name: &str) -> Option<i32> {
        let groups = self.0.read().unwrap_or_else(|p| p.into_inner());
        groups.iter().find_map(|g| g.get(name).copied())
    }

    /// How many objectives apply, across both groups.
    pub fn len(&self) -> usize {
        let groups = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = groups.iter().flat_map(|g| g.keys()).collect();
        names.sort();
        names.dedup();
        names.len()
    }

    /// Whether none applies.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(&self, slot: usize, map: HashMap<String, i32>) {
        let mut groups = self.0.write().unwrap_or_else(|p| p.into_inner());
        groups[slot] = map;
    }
}

impl kvroute_core::Priorities for Objectives {
    fn priority(&self, objective: &str) -> Option<i32> {
        Objectives::priority(self, objective)
    }
}

/// Follows a pool's pods into a registry (see the crate docs).
pub struct Discovery {
    client: Client,
    namespace: String,
    source: Source,
    metrics: DiscoveryMetrics,
    objectives: Objectives,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("namespace", &self.namespace)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Discovery through `client` in `namespace`.
    pub fn new(
        client: Client,
        namespace: String,
        source: Source,
        metrics: DiscoveryMetrics,
    ) -> Self {
        Self {
            client,
            namespace,
            source,
            metrics,
            objectives: Objectives::default(),
        }
    }

    /// A client from the environment: the in-cluster service account, else `KUBECONFIG` or
    /// `~/.kube/config`. TLS is rustls; nothing here links OpenSSL.
    pub async fn infer_client() -> Result<Client, DiscoveryError> {
        let config = kube::Config::infer().await?;
        Ok(Client::try_from(config)?)
    }

    /// The objectives' priorities, kept current while [`Discovery::run`] runs.
    pub fn objectives(&self) -> Objectives {
        self.objectives.clone()
    }

    /// Runs until `stop`. `synced` turns true once the pool is known and its pods were
    /// listed in full (what readiness waits for), and stays true: later outages keep the
    /// last known endpoints.
    pub async fn run(
        self,
        registry: Arc<Registry>,
        synced: watch::Sender<bool>,
        stop: CancellationToken,
    ) {
        let (spec_tx, spec_rx) = watch::channel(None);
        let mut tasks = tokio::task::JoinSet::new();
        let pool_name = match &self.source {
            Source::Pool { name, group } => {
                let stop = stop.clone();
                let metrics = self.metrics.clone();
                let span = info_span!("pool", pool = %name, namespace = %self.namespace);
                match group {
                    PoolGroup::V1 => tasks.spawn(
                        follow_pool(
                            Api::<v1::InferencePool>::namespaced(
                                self.client.clone(),
                                &self.namespace,
                            ),
                            name.clone(),
                            |p: &v1::InferencePool| PoolSpec::from_v1(&p.spec),
                            spec_tx,
                            metrics,
                            stop,
                        )
                        .instrument(span),
                    ),
                    PoolGroup::V1Alpha2 => tasks.spawn(
                        follow_pool(
                            Api::<v1alpha2::InferencePool>::namespaced(
                                self.client.clone(),
                                &self.namespace,
                            ),
                            name.clone(),
                            |p: &v1alpha2::InferencePool| PoolSpec::from_v1alpha2(&p.spec),
                            spec_tx,
                            metrics,
                            stop,
                        )
                        .instrument(span),
                    ),
                };
                Some(name.clone())
            }
            Source::Selector(spec) => {
                spec_tx.send_replace(Some(spec.clone()));
                // Keep the sender: a closed channel means the pool follower ended.
                tasks.spawn(async move {
                    let _keep = spec_tx;
                    std::future::pending::<()>().await;
                });
                None
            }
        };
        let objectives = ObjectiveFollower {
            pool: pool_name,
            objectives: self.objectives.clone(),
            metrics: self.metrics.clone(),
        };
        tasks.spawn(
            objectives
                .clone()
                .follow(
                    0,
                    "llm-d.ai",
                    Api::<objective::InferenceObjective>::namespaced(
                        self.client.clone(),
                        &self.namespace,
                    ),
                    |o: &objective::InferenceObjective| o.spec.spec.clone(),
                    stop.clone(),
                )
                .instrument(info_span!("objectives", group = "llm-d.ai")),
        );
        tasks.spawn(
            objectives
                .follow(
                    1,
                    "inference.networking.x-k8s.io",
                    Api::<objective_x::InferenceObjective>::namespaced(
                        self.client.clone(),
                        &self.namespace,
                    ),
                    |o: &objective_x::InferenceObjective| o.spec.spec.clone(),
                    stop.clone(),
                )
                .instrument(info_span!(
                    "objectives",
                    group = "inference.networking.x-k8s.io"
                )),
        );
        let pods = follow_pods(
            Api::<Pod>::namespaced(self.client.clone(), &self.namespace),
            spec_rx,
            registry,
            synced,
            self.metrics.clone(),
            stop.clone(),
        )
        .instrument(info_span!("pods", namespace = %self.namespace));
        tokio::select! {
            () = pods => {}
            () = stop.cancelled() => {}
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Follows one pool object, publishing its spec (None while it does not exist).
async fn follow_pool<K>(
    api: Api<K>,
    name: String,
    spec_of: fn(&K) -> Result<PoolSpec, DiscoveryError>,
    tx: watch::Sender<Option<PoolSpec>>,
    metrics: DiscoveryMetrics,
    stop: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (store, stream) = reflected(api, config);
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            e = stream.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                metrics.error("pool");
                warn!(error = %e, "pool watch failed; retrying with backoff");
            }
            Some(Ok(Event::Init | Event::InitApply(_))) => {}
            Some(Ok(event @ (Event::InitDone | Event::Apply(_) | Event::Delete(_)))) => {
                if matches!(event, Event::InitDone) {
                    metrics.relist("pool");
                }
                let spec = match store.state().first() {
                    None => {
                        warn!("InferencePool not found: no endpoints until it exists");
                        None
                    }
                    Some(pool) => match spec_of(pool) {
                        Ok(spec) => Some(spec),
                        Err(e) => {
                            warn!(error = %e, "InferencePool spec not usable: keeping the previous one");
                            continue;
                        }
                    },
                };
                tx.send_if_modified(|current| {
                    let changed = *current != spec;
                    if changed {
                        info!(spec = ?spec, "pool spec");
                        *current = spec;
                    }
                    changed
                });
            }
        }
    }
}

/// The shortest time between two rebuilds of the endpoint list from the pods' store.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// kube's default backoff (0.8 s doubling to 30 s, with jitter), except that a reset only
/// counts once the watch has gone [`STEADY_AFTER`] without failing. kube resets the backoff on
/// every `Ok` item, and its watcher yields `Event::Init` before each list attempt: with the
/// default, a list that keeps failing (an API server that is away, a CRD not installed) is
/// retried every 0.8 s for ever.
#[derive(Default)]
struct SteadyBackoff {
    inner: DefaultBackoff,
    last_failure: Option<Instant>,
}

/// How long a watch must go without failing before its backoff starts again from 0.8 s.
const STEADY_AFTER: Duration = Duration::from_secs(60);

impl Iterator for SteadyBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.last_failure = Some(Instant::now());
        self.inner.next()
    }
}

impl Backoff for SteadyBackoff {
    fn reset(&mut self) {
        if self
            .last_failure
            .is_none_or(|at| at.elapsed() >= STEADY_AFTER)
        {
            self.inner.reset();
        }
    }
}

/// A watcher with [`SteadyBackoff`], reflected into a fresh store.
fn reflected<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = watcher::Result<Event<K>>> + Send,
)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watch_fn(api, config)
        .backoff(SteadyBackoff::default())
        .reflect(writer);
    (reader, stream)
}

/// Follows the pods of the current spec into `registry`; a new selector starts a new watch
/// (and a full list), new ports only rebuild the endpoints.
async fn follow_pods(
    api: Api<Pod>,
    mut spec_rx: watch::Receiver<Option<PoolSpec>>,
    registry: Arc<Registry>,
    synced: watch::Sender<bool>,
    metrics: DiscoveryMetrics,
    stop: CancellationToken,
) {
    'spec: loop {
        let Some(mut spec) = spec_rx.borrow_and_update().clone() else {
            if registry.replace(Vec::new()) {
                warn!("pool gone: no endpoints");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = spec_rx.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let config = watcher::Config::default().labels(&spec.label_selector());
        let (store, stream) = reflected(api.clone(), config);
        let mut stream = std::pin::pin!(stream);
        let mut listed = false;
        // Rebuilds are at most one per PUBLISH_EVERY: a burst of pod changes (a rollout, a
        // thousand pods scheduled at once) costs a few rebuilds, not one per pod.
        let mut last_publish: Option<Instant> = None;
        let mut pending = false;
        loop {
            let due = last_publish.map_or_else(Instant::now, |at| at + PUBLISH_EVERY);
            let event = tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(due), if pending => {
                    pending = false;
                    last_publish = Some(Instant::now());
                    publish(&registry, &store, &spec);
                    synced.send_if_modified(|s| !std::mem::replace(s, true));
                    continue;
                }
                changed = spec_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let new = spec_rx.borrow_and_update().clone();
                    match new {
                        Some(new) if new.selector == spec.selector => {
                            spec = new;
                            if listed {
                                publish(&registry, &store, &spec);
                            }
                            continue;
                        }
                        // A new selector (or no pool): the pods come from a new list.
                        _ => {
                            spec_rx.mark_changed();
                            continue 'spec;
                        }
                    }
                }
                e = stream.next() => e,
            };
            let Some(event) = event else { return };
            let mut dirty = note(&event, &metrics, &mut listed);
            // Everything already queued (a burst of pods) goes in before one rebuild.
            while let Some(Some(event)) = stream.next().now_or_never() {
                dirty |= note(&event, &metrics, &mut listed);
            }
            pending |= dirty && listed;
        }
    }
}

/// Accounts for one pod event; returns whether the endpoint list may have changed.
fn note(
    event: &watcher::Result<Event<Pod>>,
    metrics: &DiscoveryMetrics,
    listed: &mut bool,
) -> bool {
    match event {
        Err(e) => {
            metrics.error("pods");
            warn!(error = %e, "pod watch failed; keeping the last known endpoints and retrying with backoff");
            false
        }
        Ok(Event::Init | Event::InitApply(_)) => false,
        Ok(Event::InitDone) => {
            metrics.relist("pods");
            *listed = true;
            true
        }
        Ok(Event::Apply(_) | Event::Delete(_)) => true,
    }
}

fn publish(registry: &Registry, store: &Store<Pod>, spec: &PoolSpec) {
    let pods = store.state();
    let list = endpoints(pods.iter().map(AsRef::as_ref), spec);
    let n = list.len();
    if registry.replace(list) {
        info!(endpoints = n, pods = pods.len(), "endpoints changed");
    }
}

/// Follows one group's objectives into its slot of [`Objectives`].
#[derive(Clone)]
struct ObjectiveFollower {
    pool: Option<String>,
    objectives: Objectives,
    metrics: DiscoveryMetrics,
}

impl ObjectiveFollower {
    async fn follow<K>(
        self,
        slot: usize,
        group: &'static str,
        api: Api<K>,
        spec_of: fn(&K) -> ObjectiveSpec,
        stop: CancellationToken,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let (store, stream) = reflected(api, watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        let mut told_missing = false;
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                None => return,
                Some(Err(e)) if is_not_found(&e) => {
                    // The CRD is optional (upstream's #1737 crash-looped without it): say so
                    // once, and keep looking with backoff in case it is installed later.
                    if !told_missing {
                        told_missing = true;
                        info!(
                            group,
                            "InferenceObjective CRD not installed: objectives ignored until it is"
                        );
                    }
                }
                Some(Err(e)) => {
                    self.metrics.error("objectives");
                    debug!(error = %e, "objective watch failed; retrying with backoff");
                }
                Some(Ok(Event::Init | Event::InitApply(_))) => {}
                Some(Ok(event)) => {
                    if matches!(event, Event::InitDone) {
                        self.metrics.relist("objectives");
                    }
                    let map: HashMap<String, i32> = store
                        .state()
                        .iter()
                        .filter_map(|o| {
                            let spec = spec_of(o);
                            self.applies(&spec).then(|| {
                                (
                                    o.meta().name.clone().unwrap_or_default(),
                                    spec.priority.unwrap_or(0),
                                )
                            })
                        })
                        .collect();
                    debug!(objectives = map.len(), "objectives");
                    self.objectives.set(slot, map);
                    self.metrics
                        .objectives
                        .set(i64::try_from(self.objectives.len()).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// Whether an objective targets this pool: by name, or by a selector (which kvroute,
    /// without the pool's labels, takes as matching), or any when there is no pool.
    fn applies(&self, spec: &ObjectiveSpec) -> bool {
        let Some(pool) = &self.pool else { return true };
        let named: Vec<&str> = spec
            .pool_ref
            .iter()
            .chain(&spec.pool_refs)
            .map(|r| r.name.as_str())
            .collect();
        named.contains(&pool.as_str()) || (named.is_empty() && spec.pool_selector.is_some())
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 404
    )
}
