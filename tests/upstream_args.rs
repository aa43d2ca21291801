//! Drop-in: kvroute runs with the arguments upstream's Helm charts pass to their endpoint
//! picker, with the meaning upstream gives them. The arguments are read from the charts'
//! own templates, pinned verbatim under `tests/fixtures/upstream/` (sources named in each
//! file): llm-d-router's `routerlib/templates/_deployment.yaml` (commit ebab687, as in
//! v0.10.0) and the Gateway API Inference Extension's `epplib/templates/_deployment.yaml`
//! (v1.5.0). Each rendering a chart can make is started against the in-process API server
//! (a kubeconfig as a cluster's would be), and checked for what the flags mean: the pool
//! followed, JSON logs, gRPC health on the health port under the service names the charts'
//! probes ask, the configuration file read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use harness::*;
use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const NS: &str = "llm";

/// The `--flag`s in the `epp` container's `args:` of a chart template; a flag rendered from
/// the user's flag map (`printf "--%s=%v"`, or `--{{ $key }}`) reads `<map>`.
fn template_flags(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let from = text.find("- name: epp").expect("an epp container");
    let args = from + text[from..].find("args:").expect("its args");
    let mut flags = BTreeSet::new();
    for line in text[args..].lines().skip(1) {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent == 10
            && trimmed
                .split(':')
                .next()
                .is_some_and(|k| k.chars().all(|c| c.is_ascii_alphabetic()))
            && trimmed.ends_with(':')
        {
            break;
        }
        let Some(item) = trimmed.strip_prefix("- ") else {
            continue;
        };
        if item.contains("printf \"--%s") || item.starts_with("--{{") {
            flags.insert("<map>".to_owned());
        } else if let Some(flag) = item.strip_prefix("--") {
            let name = flag.split(['=', ' ', '"']).next().unwrap();
            flags.insert(name.to_owned());
        }
    }
    flags
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name)
}

/// The charts' flags, as this test renders them. A flag added upstream fails this test
/// until kvroute has decided what it means.
#[test]
fn the_pinned_templates_pass_the_flags_this_test_renders() {
    let llm_d: Vec<&str> = vec![
        "<map>",
        "config-file",
        "endpoint-selector",
        "endpoint-target-ports",
        "grpc-health-port",
        "ha-enable-leader-election",
        "metrics-endpoint-auth",
        "pool-group",
        "pool-name",
        "pool-namespace",
        "tracing",
        "zap-encoder",
    ];
    let found = template_flags(&fixture("llm-d-router-routerlib-deployment.yaml"));
    assert_eq!(found.iter().map(String::as_str).collect::<Vec<_>>(), llm_d);
    let gie = template_flags(&fixture("gie-epplib-deployment.yaml"));
    // v1.5.0 also renders legacy metric-name flags for SGLang and TensorRT-LLM pods, which
    // its own binary refuses ("deprecated and cannot be used"); kvroute reads SGLang's names
    // by itself and refuses them too.
    let legacy = [
        "cache-info-metric",
        "kv-cache-usage-percentage-metric",
        "lora-info-metric",
        "model-server-metrics-path",
        "total-queued-requests-metric",
        "total-running-requests-metric",
    ];
    let gie: Vec<&str> = gie
        .iter()
        .map(String::as_str)
        .filter(|f| !legacy.contains(f))
        .collect();
    assert_eq!(
        gie,
        [
            "<map>",
            "config-file",
            "endpoint-selector",
            "endpoint-target-ports",
            "ha-enable-leader-election",
            "metrics-endpoint-auth",
            "pool-group",
            "pool-name",
            "pool-namespace",
            "tracing",
            "zap-encoder",
        ]
    );
}

async fn health(port: u16, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Starts kvroute with `chart_args` and no subcommand, as the charts start their image
/// (plus ports of its own, as a test must), checks it becomes ready on the pool's one pod
/// and means what the flags say, then stops it.
async fn runs_as_the_chart_says(name: &str, chart_args: &[&str], probes: &[&str]) {
    let dir = scratch(name);
    let api = ApiServer::start().await;
    api.install(Resource::inference_pool());
    api.apply(
        &Resource::inference_pool(),
        inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
    );
    api.apply(
        &Resource::pods(),
        pod(NS, "vllm-0", "127.0.0.9", &[("app", "vllm")], true),
    );
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default")).unwrap();
    let config = dir.join("default-plugins.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/kvroute.yaml"),
        &config,
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args: Vec<&str> = chart_args
        .iter()
        .map(|a| match *a {
            // The chart's fixed ports would collide between tests: 0 picks free ones.
            "9003" => "0",
            "/config/default-plugins.yaml" => config.as_str(),
            other => other,
        })
        .chain(["--grpc-port", "0", "--metrics-port", "0"])
        .collect();
    // The charts' pods set these from the downward API.
    let mut kvroute = Kvroute::launch_bare(
        &dir,
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NAMESPACE", NS),
            ("POD_NAME", "kvroute-0"),
        ],
    )
    .await;
    let ready = eventually(Duration::from_secs(10), async || {
        http(kvroute.admin_port, "GET", "/readyz", &[], Vec::new())
            .await
            .status
            == 200
    })
    .await;
    assert!(ready, "{name}: never ready: {}", kvroute.log_text());
    let m = kvroute.metrics().await;
    assert!(
        m.contains("kvroute_endpoint_in_flight_requests{endpoint=\"vllm-0\"}"),
        "{name}: the pool's pod is not an endpoint: {m}"
    );
    for service in probes {
        assert_eq!(
            health(kvroute.health_port, service).await,
            ServingStatus::Serving as i32,
            "{name}: probe service {service:?}"
        );
    }
    let log = kvroute.log_text();
    assert!(
        log.lines().all(|l| l.starts_with('{')),
        "{name}: --zap-encoder json means JSON lines: {log}"
    );
    assert!(log.contains("kvroute serving"), "{log}");
    // -v 3 and above log debug lines (the pod's refused scrapes are logged at debug after
    // the first); the default, 2 or less, does not.
    let verbose = chart_args.contains(&"--v=3");
    assert_eq!(
        log.contains("\"level\":\"DEBUG\""),
        verbose,
        "{name}: -v: {log}"
    );
    kvroute.terminate();
    assert_eq!(
        kvroute.wait_exit(Duration::from_secs(15)).await,
        Some(true),
        "{}",
        kvroute.log_text()
    );
}

/// llm-d-router's gateway chart, one replica, defaults (prometheus auth on: no auth flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_d_router_gateway_chart() {
    runs_as_the_chart_says(
        "llm-d-gateway",
        &[
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--grpc-health-port",
            "9003",
            "--tracing=false",
        ],
        &["inference-extension"],
    )
    .await;
}

/// The same chart with three replicas, prometheus auth off and a flag from the user's map,
/// rendered `"--k=v"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_d_router_gateway_chart_with_replicas() {
    runs_as_the_chart_says(
        "llm-d-gateway-ha",
        &[
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--ha-enable-leader-election",
            "--grpc-health-port",
            "9003",
            "--v=3",
            "--tracing=false",
            "--metrics-endpoint-auth=false",
        ],
        &["liveness", "readiness"],
    )
    .await;
}

/// llm-d-router's standalone chart (no InferencePool) behind agentgateway, which adds
/// `secure-serving=false` to the flag map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_d_router_standalone_chart() {
    runs_as_the_chart_says(
        "llm-d-standalone",
        &[
            "--endpoint-selector",
            "app=vllm",
            "--endpoint-target-ports",
            "8000",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--grpc-health-port",
            "9003",
            "--secure-serving=false",
            "--tracing=false",
        ],
        &["inference-extension"],
    )
    .await;
}

/// The Inference Extension's v1.5.0 chart: its default flag map `{v: 1}` is rendered as two
/// arguments, and it passes no --grpc-health-port (9003 is the default; 0 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gie_inferencepool_chart() {
    runs_as_the_chart_says(
        "gie",
        &[
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--v",
            "1",
            "--tracing=false",
            "--grpc-health-port",
            "9003",
        ],
        &["inference-extension", "liveness", "readiness"],
    )
    .await;
}

/// What kvroute cannot honour it refuses at start with a reason, rather than running
/// otherwise than asked (metrics authentication needs an API server to review tokens).
#[tokio::test]
async fn what_kvroute_cannot_honour_is_refused() {
    for (flag, want) in [
        ("--tracing=true", "no traces"),
        (
            "--metrics-endpoint-auth",
            "needs --pool-name or --endpoint-selector",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
            .args(["serve", "--endpoints", "127.0.0.1:1", flag])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flag}: {err}");
    }
}
