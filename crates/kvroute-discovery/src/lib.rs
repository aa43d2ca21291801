//! Where kvroute's endpoints come from in a cluster: an `InferencePool` (or upstream's
//! `--endpoint-selector` flags) and the pods that match it, followed through kube-rs.
//!
//! It watches three things, each with kube-runtime's `watcher` and backoff into a
//! reflector `Store` (so a relist prunes pods deleted while the watch was down): the pool
//! object (its selector and target ports), the pods that selector matches, and
//! `InferenceObjective`s when their CRD is installed. After every change it hands the
//! [`kvroute_endpoints::Registry`] the whole endpoint list (one endpoint per ready pod and
//! target port); the registry's listeners then start and stop subscribers and scrapers and
//! prune indexes and per-endpoint series. It never writes to the API server, and an API
//! server that goes away leaves the last known endpoints serving while the watches retry.

mod auth;
mod crd;
mod pool;
mod run;

pub use auth::{MetricsAuth, Verdict};
pub use crd::{ObjectiveSpec, PoolObjectReference, objective, objective_x, v1, v1alpha2};
pub use pool::{PoolSpec, ROLE_LABEL, endpoints, routable_ip};
pub use run::{Discovery, DiscoveryMetrics, Objectives, PoolGroup, Source};

/// Why discovery could not start, or why a pool's spec is not used.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// An `--endpoint-selector` term is not `key=value`.
    #[error("endpoint selector term {0:?} is not key=value")]
    Selector(String),
    /// The selector is empty, which would take every pod of the namespace.
    #[error("the pool's selector is empty: it would select every pod in the namespace")]
    EmptySelector,
    /// No target port.
    #[error("the pool has no target port")]
    NoPorts,
    /// A target port outside 1..=65535, or listed twice.
    #[error("target port {0} is out of range or listed twice")]
    Port(i32),
    /// `--pool-group` names a group kvroute does not read.
    #[error("pool group {0:?} is not inference.networking.k8s.io or inference.networking.x-k8s.io")]
    Group(String),
    /// No Kubernetes client configuration (neither in-cluster nor a kubeconfig).
    #[error("Kubernetes client configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}
