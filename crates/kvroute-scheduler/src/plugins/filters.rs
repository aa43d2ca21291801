//! Filters by pod label.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Candidates, CycleState, Filter, Plugin, SchedulingRequest};

/// The label that names a pod's part in disaggregated serving.
pub(crate) const ROLE_LABEL: &str = "llm-d.ai/role";

/// One `matchExpressions` entry of a Kubernetes label selector.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Selector {
    key: String,
    operator: Operator,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// Keeps the candidates whose labels match a Kubernetes label selector
/// (`label-selector-filter`: `matchLabels` and `matchExpressions`, all must hold).
#[derive(Debug)]
pub(crate) struct LabelSelectorFilter {
    labels: BTreeMap<String, String>,
    expressions: Vec<Selector>,
}

impl LabelSelectorFilter {
    pub(crate) fn new(labels: BTreeMap<String, String>, expressions: Vec<Selector>) -> Self {
        Self {
            labels,
            expressions,
        }
    }
}

impl Plugin for LabelSelectorFilter {
    fn type_name(&self) -> &'static str {
        "label-selector-filter"
    }

    fn filter(&self) -> Option<&dyn Filter> {
        Some(self)
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        keep: &mut [bool],
    ) {
        for (k, (_, ep)) in keep.iter_mut().zip(candidates.iter()) {
            let labels = &ep.endpoint().labels;
            *k = self
                .labels
                .iter()
                .all(|(key, v)| labels.get(key) == Some(v))
                && self.expressions.iter().all(|e| e.matches(labels));
        }
    }
}

/// Keeps the pods that can play one part of disaggregated serving, by their `llm-d.ai/role`
/// label (`decode-filter`, `prefill-filter`, with upstream's accepted values); a decode
/// filter keeps pods without the label (they do everything), a prefill filter does not.
#[derive(Debug)]
pub(crate) struct RoleFilter {
    type_name: &'static str,
    accepted: &'static [&'static str],
    unlabelled: bool,
}

impl RoleFilter {
    pub(crate) fn decode() -> Self {
        Self {
            type_name: "decode-filter",
            accepted: &["decode", "prefill-decode", "both", "encode-prefill-decode"],
            unlabelled: true,
        }
    }

    pub(crate) fn prefill() -> Self {
        Self {
            type_name: "prefill-filter",
            accepted: &[
                "prefill",
                "encode-prefill",
                "prefill-decode",
                "both",
                "encode-prefill-decode",
            ],
            unlabelled: false,
        }
    }
}

impl Plugin for RoleFilter {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn filter(&self) -> Option<&dyn Filter> {
        Some(self)
    }
}

impl Filter for RoleFilter {
    fn filter(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        keep: &mut [bool],
    ) {
        for (k, (_, ep)) in keep.iter_mut().zip(candidates.iter()) {
            *k = match ep.endpoint().labels.get(ROLE_LABEL) {
                Some(role) => self.accepted.contains(&role.as_str()),
                None => self.unlabelled,
            };
        }
    }
}
