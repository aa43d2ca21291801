//! The custom resources kvroute reads, field for field as upstream defines them
//! (`kubernetes-sigs/gateway-api-inference-extension` `api/v1/inferencepool_types.go` and
//! `api/v1alpha2/inferencepool_types.go`; `llm-d/llm-d-router`'s `InferenceObjective`).
//! Every field is defaulted when absent, so that an object the API server accepted is never
//! refused here (a refused object would stall the whole watch); what a field must hold is
//! checked where it is used ([`crate::PoolSpec::from_v1`]).

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `InferencePool` of `inference.networking.k8s.io/v1`: the GA shape.
pub mod v1 {
    use super::*;

    /// Which pods serve the pool, on which ports, and which picker routes for it.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[kube(
        group = "inference.networking.k8s.io",
        version = "v1",
        kind = "InferencePool",
        namespaced,
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase", default)]
    pub struct InferencePoolSpec {
        /// Pods matching these labels, in the pool's namespace, are its members.
        pub selector: LabelSelector,
        /// The model servers' ports (one per data-parallel rank where more are allowed).
        pub target_ports: Vec<Port>,
        /// The endpoint picker Envoy asks, and what it does when the picker fails.
        pub endpoint_picker_ref: EndpointPickerRef,
    }

    /// Upstream's simplified selector: `matchLabels` only.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[serde(rename_all = "camelCase", default)]
    pub struct LabelSelector {
        /// Every pair must match.
        pub match_labels: BTreeMap<String, String>,
    }

    /// One target port.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[serde(default)]
    pub struct Port {
        /// 1 to 65535.
        pub number: i32,
    }

    /// The picker's Service (read for the docs and logs; Envoy is what calls it).
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[serde(rename_all = "camelCase", default)]
    pub struct EndpointPickerRef {
        /// `""` (core) unless set.
        pub group: Option<String>,
        /// `Service` unless set.
        pub kind: Option<String>,
        /// The Service's name.
        pub name: String,
        /// The picker's port (9002 when unset).
        pub port_number: Option<i32>,
        /// `FailOpen` or `FailClose` (the default).
        pub failure_mode: Option<String>,
    }
}

/// `InferencePool` of `inference.networking.x-k8s.io/v1alpha2`, which clusters installed
/// before v1 still serve.
pub mod v1alpha2 {
    use super::*;

    /// The older shape: a plain label map and a single port.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferencePool",
        namespaced,
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase", default)]
    pub struct InferencePoolSpec {
        /// Pods with all of these labels are members.
        pub selector: BTreeMap<String, String>,
        /// The model servers' port.
        pub target_port_number: i32,
        /// The picker's Service.
        pub extension_ref: Option<Extension>,
    }

    /// The picker's Service and failure mode, inline in the spec.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Extension {
        /// `""` (core) unless set.
        pub group: Option<String>,
        /// `Service` unless set.
        pub kind: Option<String>,
        /// The Service's name.
        pub name: String,
        /// The picker's port (9002 when unset).
        pub port_number: Option<i32>,
        /// `FailOpen` or `FailClose` (the default).
        pub failure_mode: Option<String>,
    }
}

/// The fields of an `InferenceObjective` kvroute reads, shared by both groups that serve it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectiveSpec {
    /// Higher is more important; unset reads as 0.
    pub priority: Option<i32>,
    /// The pool it applies to (v1alpha2).
    pub pool_ref: Option<PoolObjectReference>,
    /// The pools it applies to (llm-d's v1 targeting fields, stored in v1alpha2 too).
    pub pool_refs: Vec<PoolObjectReference>,
    /// Pools it applies to by label (not matched by kvroute, which has no pool labels in
    /// selector mode; an objective with only a selector applies to every pool).
    pub pool_selector: Option<serde_json::Value>,
}

/// A pool named in the objective's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolObjectReference {
    /// The pool's group.
    pub group: Option<String>,
    /// `InferencePool` unless set.
    pub kind: Option<String>,
    /// The pool's name.
    pub name: String,
}

/// `InferenceObjective` in `llm-d.ai`, where it lives now (llm-d-router #1449).
pub mod objective {
    use super::*;

    /// A request class's priority in a pool.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[kube(
        group = "llm-d.ai",
        version = "v1alpha2",
        kind = "InferenceObjective",
        namespaced,
        schema = "disabled"
    )]
    pub struct InferenceObjectiveSpec {
        /// What kvroute reads.
        #[serde(flatten)]
        pub spec: ObjectiveSpec,
    }
}

/// `InferenceObjective` in the Inference Extension's older group.
pub mod objective_x {
    use super::*;

    /// A request class's priority in a pool.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceObjective",
        namespaced,
        schema = "disabled"
    )]
    pub struct InferenceObjectiveSpec {
        /// What kvroute reads.
        #[serde(flatten)]
        pub spec: ObjectiveSpec,
    }
}
