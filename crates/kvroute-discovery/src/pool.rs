//! What a pool is once read from any source (an `InferencePool` of either version, or
//! upstream's `--endpoint-selector` / `--endpoint-target-ports` flags), and which endpoints
//! its pods make. Plain functions over plain data: the watch loops live in `crate::run`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use kvroute_core::{Endpoint, EndpointId};

use crate::DiscoveryError;
use crate::crd::{v1, v1alpha2};

/// The label vLLM-on-llm-d pods carry to say they prefill, decode or both.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// Which pods are the pool's members and on which ports they serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// Pods with every one of these labels, in the pool's namespace; never empty (an empty
    /// selector would take every pod of the namespace).
    pub selector: BTreeMap<String, String>,
    /// One endpoint per port of each pod; the port's index is the endpoint's data-parallel
    /// rank.
    pub target_ports: Vec<u16>,
}

impl PoolSpec {
    /// A spec from upstream's flags: `--endpoint-selector app=vllm,tier=a` and
    /// `--endpoint-target-ports 8000,8001`.
    pub fn from_flags(selector: &str, ports: &[u16]) -> Result<Self, DiscoveryError> {
        let mut labels = BTreeMap::new();
        for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| DiscoveryError::Selector(term.to_owned()))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Self::checked(labels, ports.iter().map(|&p| i32::from(p)).collect())
    }

    /// The spec of an `inference.networking.k8s.io/v1` pool.
    pub fn from_v1(spec: &v1::InferencePoolSpec) -> Result<Self, DiscoveryError> {
        Self::checked(
            spec.selector.match_labels.clone(),
            spec.target_ports.iter().map(|p| p.number).collect(),
        )
    }

    /// The spec of an `inference.networking.x-k8s.io/v1alpha2` pool.
    pub fn from_v1alpha2(spec: &v1alpha2::InferencePoolSpec) -> Result<Self, DiscoveryError> {
        Self::checked(spec.selector.clone(), vec![spec.target_port_number])
    }

    fn checked(
        selector: BTreeMap<String, String>,
        ports: Vec<i32>,
    ) -> Result<Self, DiscoveryError> {
        if selector.is_empty() {
            return Err(DiscoveryError::EmptySelector);
        }
        if ports.is_empty() {
            return Err(DiscoveryError::NoPorts);
        }
        let mut target_ports = Vec::with_capacity(ports.len());
        for p in ports {
            let port = u16::try_from(p)
                .ok()
                .filter(|&p| p > 0)
                .ok_or(DiscoveryError::Port(p))?;
            if target_ports.contains(&port) {
                return Err(DiscoveryError::Port(p));
            }
            target_ports.push(port);
        }
        Ok(Self {
            selector,
            target_ports,
        })
    }

    /// The selector as the API server's `labelSelector` parameter.
    pub fn label_selector(&self) -> String {
        self.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether a pod's labels satisfy the selector (the server filters too; this guards
    /// against a watch that still holds pods of a selector that just changed).
    pub fn selects(&self, pod: &Pod) -> bool {
        let labels = pod.metadata.labels.as_ref();
        self.selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }
}

/// Whether a pod can take requests: Ready, with an IP, and not on its way out (a pod with a
/// deletion timestamp is draining, as a Service's endpoints drop it).
pub fn routable_ip(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// The endpoints `pods` make under `spec`, sorted by id: one per target port of each
/// routable pod. A pod with one port is its name; with more, `name-rank-N` (upstream's
/// naming), rank N serving on the Nth port and publishing KV events on the events port + N.
pub fn endpoints<'a>(pods: impl IntoIterator<Item = &'a Pod>, spec: &PoolSpec) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for pod in pods {
        if !spec.selects(pod) {
            continue;
        }
        let (Some(name), Some(ip)) = (pod.metadata.name.as_deref(), routable_ip(pod)) else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        for (rank, &port) in spec.target_ports.iter().enumerate() {
            let id = if spec.target_ports.len() == 1 {
                EndpointId::new(name)
            } else {
                EndpointId::new(format!("{name}-rank-{rank}"))
            };
            out.push(Endpoint {
                id,
                address: SocketAddr::new(ip, port),
                labels: labels.clone(),
                rank: u16::try_from(rank).unwrap_or(u16::MAX),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, ip: Option<&str>, ready: bool, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn flags_parse_like_upstream() {
        let spec = PoolSpec::from_flags(" app=vllm , tier==a", &[8000, 8001]).unwrap();
        assert_eq!(spec.label_selector(), "app=vllm,tier=a");
        assert_eq!(spec.target_ports, [8000, 8001]);
        for (selector, ports, want) in [
            ("", &[8000][..], "empty"),
            ("app", &[8000][..], "key=value"),
            ("=x", &[8000][..], "key=value"),
            ("app=x", &[][..], "no target port"),
            ("app=x", &[0][..], "port 0"),
            ("app=x", &[8000, 8000][..], "port 8000"),
        ] {
            let err = PoolSpec::from_flags(selector, ports)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{selector:?} {ports:?}: {err}");
        }
    }

    #[test]
    fn pool_versions_read_the_same() {
        let v1 = v1::InferencePoolSpec {
            selector: v1::LabelSelector {
                match_labels: [("app".into(), "vllm".into())].into(),
            },
            target_ports: vec![v1::Port { number: 8000 }],
            endpoint_picker_ref: v1::EndpointPickerRef::default(),
        };
        let old = v1alpha2::InferencePoolSpec {
            selector: [("app".into(), "vllm".into())].into(),
            target_port_number: 8000,
            extension_ref: None,
        };
        assert_eq!(
            PoolSpec::from_v1(&v1).unwrap(),
            PoolSpec::from_v1alpha2(&old).unwrap()
        );
        let bad = v1alpha2::InferencePoolSpec {
            target_port_number: 70_000,
            ..old
        };
        assert!(matches!(
            PoolSpec::from_v1alpha2(&bad),
            Err(DiscoveryError::Port(70_000))
        ));
    }

    #[test]
    fn only_ready_selected_pods_with_an_ip_are_endpoints() {
        let spec = PoolSpec::from_flags("app=vllm", &[8000]).unwrap();
        let mut terminating = pod("d", Some("10.0.0.4"), true, &[("app", "vllm")]);
        terminating.metadata.deletion_timestamp = Some(Time(Default::default()));
        let pods = [
            pod(
                "b",
                Some("10.0.0.2"),
                true,
                &[("app", "vllm"), (ROLE_LABEL, "decode")],
            ),
            pod("a", Some("10.0.0.1"), true, &[("app", "vllm")]),
            pod("c", Some("10.0.0.3"), false, &[("app", "vllm")]),
            terminating,
            pod("e", None, true, &[("app", "vllm")]),
            pod("f", Some("10.0.0.6"), true, &[("app", "other")]),
            pod("g", Some("not-an-ip"), true, &[("app", "vllm")]),
        ];
        let eps = endpoints(&pods, &spec);
        let ids: Vec<&str> = eps.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(eps[1].address, "10.0.0.2:8000".parse().unwrap());
        assert_eq!(
            eps[1].labels.get(ROLE_LABEL).map(String::as_str),
            Some("decode")
        );
    }

    #[test]
    fn data_parallel_ranks_are_one_endpoint_per_port() {
        let spec = PoolSpec::from_flags("app=vllm", &[8000, 8001]).unwrap();
        let pods = [pod("p", Some("fd00::1"), true, &[("app", "vllm")])];
        let eps = endpoints(&pods, &spec);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].id.as_str(), "p-rank-0");
        assert_eq!(eps[1].id.as_str(), "p-rank-1");
        assert_eq!(eps[1].rank, 1);
        assert_eq!(eps[1].address, "[fd00::1]:8001".parse().unwrap());
    }
}
