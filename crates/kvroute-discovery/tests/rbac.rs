//! The shipped Role (`deploy/kubernetes/rbac.yaml`) grants exactly what discovery needs: every
//! call discovery makes to the API server is allowed by it, and it allows nothing beyond
//! reading pods, pools and objectives in one namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvroute_discovery::{Discovery, DiscoveryMetrics, PoolGroup, PoolSpec, Source};
use kvroute_endpoints::Registry;
use serde::Deserialize;
use serde_json::{Value, json};
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use test_support::http::eventually;
use tokio_util::sync::CancellationToken;

/// (API group, resource) pairs discovery may read, and nothing else.
const READABLE: [(&str, &str); 5] = [
    ("", "pods"),
    ("inference.networking.k8s.io", "inferencepools"),
    ("inference.networking.x-k8s.io", "inferencepools"),
    ("llm-d.ai", "inferenceobjectives"),
    ("inference.networking.x-k8s.io", "inferenceobjectives"),
];
const VERBS: [&str; 3] = ["get", "list", "watch"];

fn shipped() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Every (group, resource, verb) the shipped Role grants; panics on anything broader than
/// reads of [`READABLE`] in one namespace.
fn granted() -> BTreeSet<(String, String, String)> {
    let docs = shipped();
    let mut grants = BTreeSet::new();
    let mut roles = 0;
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap();
        match kind {
            "ServiceAccount" => {}
            "RoleBinding" => {
                assert_eq!(doc["roleRef"]["kind"], "Role", "bound to a namespaced Role");
                assert_eq!(doc["roleRef"]["name"], "kvroute");
            }
            "Role" => {
                roles += 1;
                assert!(
                    doc["metadata"]["namespace"].is_string(),
                    "a namespaced Role"
                );
                for rule in doc["rules"].as_array().unwrap() {
                    assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
                    let (groups, resources, verbs) = (
                        strings(&rule["apiGroups"]),
                        strings(&rule["resources"]),
                        strings(&rule["verbs"]),
                    );
                    for g in &groups {
                        for r in &resources {
                            assert!(
                                READABLE.contains(&(g.as_str(), r.as_str())),
                                "the Role grants {g:?}/{r:?}, which discovery never reads"
                            );
                            for v in &verbs {
                                assert!(VERBS.contains(&v.as_str()), "the Role grants {v:?}");
                                grants.insert((g.clone(), r.clone(), v.clone()));
                            }
                        }
                    }
                }
            }
            other => panic!(
                "deploy/kubernetes/rbac.yaml holds a {other}: only a namespaced Role is needed"
            ),
        }
    }
    assert_eq!(roles, 1);
    grants
}

#[test]
fn the_role_grants_reads_in_one_namespace_only() {
    let grants = granted();
    assert_eq!(grants.len(), READABLE.len() * VERBS.len(), "{grants:?}");
}

async fn exercise(server: &ApiServer, source: Source) {
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let discovery = Discovery::new(client, "llm".into(), source, DiscoveryMetrics::default());
    let registry = Arc::new(Registry::new());
    let (tx, mut synced) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let task = tokio::spawn(discovery.run(Arc::clone(&registry), tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), async || registry.len() == 1).await);
    stop.cancel();
    task.await.unwrap();
}

/// Every request discovery makes, in each of its modes, is one the Role allows.
#[tokio::test]
async fn every_call_discovery_makes_is_granted() {
    let server = ApiServer::start().await;
    let old_pool = Resource::new(
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencepools",
        "InferencePool",
    );
    let old_objective = Resource::new(
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferenceobjectives",
        "InferenceObjective",
    );
    for r in [
        Resource::inference_pool(),
        old_pool.clone(),
        Resource::inference_objective(),
        old_objective,
    ] {
        server.install(r);
    }
    server.apply(
        &Resource::inference_pool(),
        inference_pool("llm", "pool", &[("app", "vllm")], &[8000]),
    );
    server.apply(
        &old_pool,
        json!({"metadata": {"name": "pool", "namespace": "llm"},
               "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000}}),
    );
    server.apply(
        &Resource::pods(),
        pod("llm", "a", "10.0.0.1", &[("app", "vllm")], true),
    );
    for source in [
        Source::Pool {
            name: "pool".into(),
            group: PoolGroup::V1,
        },
        Source::Pool {
            name: "pool".into(),
            group: PoolGroup::V1Alpha2,
        },
        Source::Selector(PoolSpec::from_flags("app=vllm", &[8000]).unwrap()),
    ] {
        exercise(&server, source).await;
    }
    let grants = granted();
    let used = server.calls();
    assert!(used.len() >= 8, "{used:?}");
    for (group, resource, verb, namespace) in &used {
        assert_eq!(
            namespace, "llm",
            "a call outside the pool's namespace: {resource}"
        );
        assert!(
            grants.contains(&(group.clone(), resource.clone(), verb.clone())),
            "discovery calls {verb} {group:?}/{resource}, which the Role does not grant"
        );
    }
}

/// The ClusterRole for `--metrics-endpoint-auth` lets kvroute create the two reviews and
/// nothing else, and the reader role grants only `get /metrics`.
#[test]
fn the_metrics_auth_roles_grant_the_two_reviews_and_the_reading_only() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/metrics-auth.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect();
    let role = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap()["rules"]
            .clone()
    };
    assert_eq!(
        role("kvroute-metrics-auth"),
        json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
        ])
    );
    assert_eq!(
        role("kvroute-metrics-reader"),
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );
    assert_eq!(docs.len(), 4);
}
