//! Discovery through the real kube-rs client against the in-process API server
//! (`test_support::apiserver`): list, watch, bookmarks, `410 Gone`, restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_discovery::{Discovery, DiscoveryMetrics, PoolGroup, PoolSpec, ROLE_LABEL, Source};
use kvroute_endpoints::Registry;
use serde_json::json;
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use test_support::http::eventually;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NS: &str = "llm";
const SOON: Duration = Duration::from_secs(10);

struct Running {
    registry: Arc<Registry>,
    synced: watch::Receiver<bool>,
    objectives: kvroute_discovery::Objectives,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(server: &ApiServer, source: Source) -> Self {
        let config = kube::Config::new(server.url().parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let mut prom = prometheus_client::registry::Registry::default();
        let discovery = Discovery::new(
            client,
            NS.into(),
            source,
            DiscoveryMetrics::register(&mut prom),
        );
        let objectives = discovery.objectives();
        let registry = Arc::new(Registry::new());
        let (tx, synced) = watch::channel(false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(discovery.run(Arc::clone(&registry), tx, stop.clone()));
        Self {
            registry,
            synced,
            objectives,
            stop,
            task,
        }
    }

    fn ids(&self) -> Vec<String> {
        self.registry
            .snapshot()
            .iter()
            .map(|e| e.id().to_string())
            .collect()
    }

    async fn until_ids(&self, want: &[&str]) {
        let ok = eventually(SOON, async || self.ids() == want).await;
        assert!(ok, "endpoints {:?}, wanted {want:?}", self.ids());
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(SOON, self.task)
            .await
            .expect("discovery stops when cancelled")
            .unwrap();
    }
}

fn pool_source() -> Source {
    Source::Pool {
        name: "pool".into(),
        group: PoolGroup::V1,
    }
}

fn vllm(name: &str, ip: &str, ready: bool) -> serde_json::Value {
    pod(NS, name, ip, &[("app", "vllm")], ready)
}

async fn with_pool() -> ApiServer {
    let server = ApiServer::start().await;
    server.install(Resource::inference_pool());
    server.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
    );
    server
}

#[tokio::test]
async fn a_pod_turning_ready_becomes_an_endpoint_and_leaves_when_not() {
    let server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    server.apply(&Resource::pods(), vllm("b", "10.0.0.2", false));
    // Another namespace and another app are never members.
    server.apply(
        &Resource::pods(),
        pod("other", "a", "10.0.0.9", &[("app", "vllm")], true),
    );
    server.apply(
        &Resource::pods(),
        pod(NS, "c", "10.0.0.3", &[("app", "web")], true),
    );
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a"]).await;
    assert!(*run.synced.borrow(), "ready after the first full list");
    assert_eq!(
        run.registry.snapshot()[0].address(),
        "10.0.0.1:8000".parse().unwrap()
    );

    server.apply(&Resource::pods(), vllm("b", "10.0.0.2", true));
    run.until_ids(&["a", "b"]).await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", false));
    run.until_ids(&["b"]).await;
    server.delete(&Resource::pods(), NS, "b");
    run.until_ids(&[]).await;
    run.stop().await;
}

#[tokio::test]
async fn not_ready_until_the_pool_exists() {
    let server = ApiServer::start().await;
    server.install(Resource::inference_pool());
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    let run = Running::start(&server, pool_source()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!*run.synced.borrow(), "no pool, not ready");
    assert!(run.registry.is_empty());
    server.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
    );
    run.until_ids(&["a"]).await;
    assert!(*run.synced.borrow());
    // The pool deleted: its endpoints go.
    server.delete(&Resource::inference_pool(), NS, "pool");
    run.until_ids(&[]).await;
    run.stop().await;
}

#[tokio::test]
async fn a_pod_deleted_while_the_watch_is_down_is_pruned_after_the_relist() {
    let mut server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    server.apply(&Resource::pods(), vllm("b", "10.0.0.2", true));
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a", "b"]).await;

    server.stop();
    server.delete(&Resource::pods(), NS, "a");
    server.apply(&Resource::pods(), vllm("c", "10.0.0.3", true));
    // The history is gone: the client's version is too old, so it must list again.
    server.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        run.ids(),
        ["a", "b"],
        "the last known pool serves while the API server is away"
    );
    server.start_again().await;
    run.until_ids(&["b", "c"]).await;
    assert!(
        server.served().gone >= 1,
        "the watch resumed into a 410: {:?}",
        server.served()
    );
    run.stop().await;
}

#[tokio::test]
async fn a_watch_that_expires_while_connected_relists() {
    let server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a"]).await;
    let lists = server.served().lists;
    server.bookmark();
    server.apply(&Resource::pods(), vllm("b", "10.0.0.2", true));
    run.until_ids(&["a", "b"]).await;
    server.compact();
    server.drop_watches();
    server.delete(&Resource::pods(), NS, "b");
    run.until_ids(&["a"]).await;
    assert!(
        eventually(SOON, async || server.served().lists > lists).await,
        "a relist followed the expiry: {:?}",
        server.served()
    );
    run.stop().await;
}

#[tokio::test]
async fn the_pools_selector_and_ports_change() {
    let server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    server.apply(
        &Resource::pods(),
        pod(NS, "w", "10.0.0.5", &[("app", "web")], true),
    );
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a"]).await;

    server.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "web")], &[8000]),
    );
    run.until_ids(&["w"]).await;

    server.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "web")], &[9000, 9001]),
    );
    run.until_ids(&["w-rank-0", "w-rank-1"]).await;
    let snapshot = run.registry.snapshot();
    assert_eq!(snapshot[1].address(), "10.0.0.5:9001".parse().unwrap());
    assert_eq!(snapshot[1].endpoint().rank, 1);
    run.stop().await;
}

#[tokio::test]
async fn the_api_server_restarting_keeps_the_last_known_pool() {
    let mut server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a"]).await;
    server.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(run.ids(), ["a"]);
    server.start_again().await;
    // The history was kept (a restart in front of the same etcd): the watch resumes.
    server.apply(&Resource::pods(), vllm("b", "10.0.0.2", true));
    run.until_ids(&["a", "b"]).await;
    run.stop().await;
}

#[tokio::test]
async fn selector_flags_follow_pods_without_a_pool_and_carry_labels() {
    let server = ApiServer::start().await;
    server.apply(
        &Resource::pods(),
        pod(
            NS,
            "p",
            "10.0.0.1",
            &[("app", "vllm"), (ROLE_LABEL, "prefill")],
            true,
        ),
    );
    let spec = PoolSpec::from_flags("app=vllm", &[8000]).unwrap();
    let run = Running::start(&server, Source::Selector(spec)).await;
    run.until_ids(&["p"]).await;
    let ep = run.registry.snapshot()[0].endpoint().clone();
    assert_eq!(
        ep.labels.get(ROLE_LABEL).map(String::as_str),
        Some("prefill")
    );
    assert!(*run.synced.borrow());
    run.stop().await;
}

#[tokio::test]
async fn the_older_pool_group_is_read_too() {
    let server = ApiServer::start().await;
    let old = Resource::new(
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencepools",
        "InferencePool",
    );
    server.install(old.clone());
    server.apply(
        &old,
        json!({
            "metadata": {"name": "pool", "namespace": NS},
            "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                     "extensionRef": {"name": "kvroute", "failureMode": "FailClose"}},
        }),
    );
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    let source = Source::Pool {
        name: "pool".into(),
        group: PoolGroup::V1Alpha2,
    };
    let run = Running::start(&server, source).await;
    run.until_ids(&["a"]).await;
    run.stop().await;
}

#[tokio::test]
async fn a_missing_objective_crd_is_ignored_until_installed() {
    let server = with_pool().await;
    server.apply(&Resource::pods(), vllm("a", "10.0.0.1", true));
    let run = Running::start(&server, pool_source()).await;
    run.until_ids(&["a"]).await;
    assert!(run.objectives.is_empty());
    // Asked for, then again with a growing backoff: kube's default one is reset by the
    // watcher's own `Init` before every list, which would ask every 0.8 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let asked = server.served().not_found;
    assert!(
        (2..=10).contains(&asked),
        "the missing CRDs were asked for {asked} times in 6 s"
    );

    server.install(Resource::inference_objective());
    for (name, pool, priority) in [("critical", "pool", 10), ("elsewhere", "other", 5)] {
        server.apply(
            &Resource::inference_objective(),
            json!({"metadata": {"name": name, "namespace": NS},
                   "spec": {"priority": priority, "poolRef": {"name": pool}}}),
        );
    }
    server.apply(
        &Resource::inference_objective(),
        json!({"metadata": {"name": "default", "namespace": NS},
               "spec": {"poolRefs": [{"name": "pool"}]}}),
    );
    let found = eventually(Duration::from_secs(30), async || run.objectives.len() == 2).await;
    assert!(
        found,
        "objectives after the CRD appeared: {}",
        run.objectives.len()
    );
    assert_eq!(run.objectives.priority("critical"), Some(10));
    assert_eq!(run.objectives.priority("default"), Some(0));
    assert_eq!(run.objectives.priority("elsewhere"), None, "another pool's");
    run.stop().await;
}

/// Reports how long 1,000 pods take to become endpoints, listed at start (two pages) and
/// appearing at once on a running watch.
#[tokio::test]
async fn a_thousand_pods_at_once() {
    let server = with_pool().await;
    let ip = |i: usize| format!("10.1.{}.{}", i / 250, i % 250 + 1);
    for i in 0..1_000 {
        server.apply(
            &Resource::pods(),
            vllm(&format!("pod-{i:04}"), &ip(i), true),
        );
    }
    let started = Instant::now();
    let run = Running::start(&server, pool_source()).await;
    assert!(eventually(SOON, async || run.registry.len() == 1_000).await);
    let listed = started.elapsed();
    assert!(
        server.served().lists >= 2,
        "paginated: {:?}",
        server.served()
    );

    let started = Instant::now();
    for i in 1_000..2_000 {
        server.apply(
            &Resource::pods(),
            vllm(&format!("pod-{i:04}"), &ip(i), true),
        );
    }
    assert!(eventually(SOON, async || run.registry.len() == 2_000).await);
    let watched = started.elapsed();
    eprintln!(
        "1,000 pods: listed into endpoints in {listed:?}; 1,000 more through the watch in {watched:?}"
    );
    run.stop().await;
}
