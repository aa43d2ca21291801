//! Reloading `--config-file` end to end: while a steady stream of requests goes through real
//! Envoy, the file is rewritten with another valid configuration (taken at once), an invalid
//! one (refused, the running one stays) and a valid one again; no request is lost or fails.
//! And `kvroute config check` on good and bad files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use tokio_util::sync::CancellationToken;

/// Only the endpoints labelled `zone: b`, by load.
const ZONE_B: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: label-selector-filter
  parameters:
    matchLabels: {zone: b}
- type: load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: label-selector-filter
  - pluginRef: load-scorer
  - pluginRef: max-score-picker
";

/// A plugin type kvroute does not know, on line 5.
const UNKNOWN_PLUGIN: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: load-scorer
- type: no-such-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: no-such-filter
  - pluginRef: load-scorer
  - pluginRef: max-score-picker
";

/// How long a rewritten file may take to be noticed: it is looked at every 2 s.
const NOTICED_WITHIN: Duration = Duration::from_secs(6);

fn kvroute_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(args)
        .output()
        .unwrap()
}

/// Requests per upstream host ("" for none), from Envoy's access log.
async fn per_pod(envoy: &Envoy, sent: &[Sent]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for up in envoy.upstreams_of(sent).await {
        *counts.entry(up).or_insert(0) += 1;
    }
    counts
}

/// Waits until the log has `n` lines with `text`; returns when that was seen.
async fn logged(kvroute: &Kvroute, text: &str, n: usize) -> Instant {
    let seen = eventually(NOTICED_WITHIN, async || kvroute.log_count(text) >= n).await;
    assert!(seen, "no {n}× {text:?} in the log:\n{}", kvroute.log_text());
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_changes_are_applied_or_refused_without_losing_a_request() {
    let dir = scratch("reload");
    // Simulated vLLM pods: they serve the /metrics kvroute scrapes, so their load is known.
    let stop = CancellationToken::new();
    let pods = sim_pods(3, &stop).await;
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
    let names = ["a", "b", "c"];
    let endpoints: String = addrs
        .iter()
        .zip(names)
        .map(|(a, z)| format!("- {{address: \"{a}\", name: pod-{z}, labels: {{zone: {z}}}}}\n"))
        .collect();
    let endpoints_file = dir.join("endpoints.yaml");
    std::fs::write(&endpoints_file, format!("endpoints:\n{endpoints}")).unwrap();
    let default = kvroute_cli(&["config", "default"]);
    assert!(default.status.success());
    let config_file = dir.join("kvroute.yaml");
    write_atomically(&config_file, &String::from_utf8(default.stdout).unwrap());
    let kvroute = Kvroute::start_files(&dir, &endpoints_file, &config_file).await;
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
    let zone_b = addrs[1].to_string();
    let traffic = Traffic::start(envoy.port, 4, "reload");
    let begin = Instant::now();

    // The default configuration spreads distinct prompts sent concurrently.
    let first = traffic
        .wait_answered_since(begin, 40, Duration::from_secs(10))
        .await;
    let counts = per_pod(&envoy, &first).await;
    println!("default configuration: {counts:?}");
    assert!(counts.len() >= 2, "{counts:?}");

    // Only zone b: every request from the reload on goes there.
    write_atomically(&config_file, ZONE_B);
    let written = Instant::now();
    let reloaded = logged(&kvroute, "routing configuration reloaded", 1).await;
    println!("zone-b configuration taken in {:?}", reloaded - written);
    let after = traffic
        .wait_answered_since(reloaded, 40, Duration::from_secs(10))
        .await;
    let counts = per_pod(&envoy, &after).await;
    println!("zone-b configuration: {counts:?}");
    assert_eq!(counts.keys().collect::<Vec<_>>(), [&zone_b], "{counts:?}");

    // An unknown plugin type: refused, naming it; zone b only, still.
    write_atomically(&config_file, UNKNOWN_PLUGIN);
    let written = Instant::now();
    let refused = logged(&kvroute, "routing configuration refused", 1).await;
    println!("bad configuration refused in {:?}", refused - written);
    let line = kvroute
        .log_text()
        .lines()
        .find(|l| l.contains("routing configuration refused"))
        .unwrap()
        .to_owned();
    assert!(line.contains("no-such-filter"), "{line}");
    let after = traffic
        .wait_answered_since(refused, 40, Duration::from_secs(10))
        .await;
    let counts = per_pod(&envoy, &after).await;
    println!("after the refused configuration: {counts:?}");
    assert_eq!(counts.keys().collect::<Vec<_>>(), [&zone_b], "{counts:?}");
    assert_eq!(kvroute.log_count("routing configuration reloaded"), 1);

    // Valid again (fewest in flight, every endpoint): the stream spreads again.
    let least = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/least-in-flight.yaml"),
    )
    .unwrap();
    write_atomically(&config_file, &least);
    let written = Instant::now();
    let reloaded = logged(&kvroute, "routing configuration reloaded", 2).await;
    println!(
        "least-in-flight configuration taken in {:?}",
        reloaded - written
    );
    let after = traffic
        .wait_answered_since(reloaded, 60, Duration::from_secs(10))
        .await;
    let counts = per_pod(&envoy, &after).await;
    println!("least-in-flight configuration: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");

    // Nothing lost, nothing failed.
    let (sent, answers) = traffic.stop().await;
    let ok = answers.iter().filter(|s| s.status == Some(200)).count();
    println!(
        "{sent} requests sent, {ok} answered 200, in {:?}",
        begin.elapsed()
    );
    assert_eq!(sent, answers.len());
    let failed: Vec<_> = answers.iter().filter(|s| s.status != Some(200)).collect();
    assert!(failed.is_empty(), "{failed:?}\n{}", kvroute.log_text());
    assert_eq!(kvroute.log_count("routing configuration refused"), 1);
    let metrics = kvroute.metrics().await;
    for want in [
        r#"kvroute_config_reloads_total{result="applied"} 2"#,
        r#"kvroute_config_reloads_total{result="refused"} 1"#,
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }
    stop.cancel();
}

#[test]
fn config_check_names_the_bad_plugin_and_its_line() {
    let dir = scratch("config-check");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, UNKNOWN_PLUGIN).unwrap();
    let out = kvroute_cli(&["config", "check", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no-such-filter") && stderr.contains("line 5"),
        "{stderr}"
    );

    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(shipped).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = kvroute_cli(&["config", "check", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": ok"), "{stdout}");
        checked += 1;
    }
    assert!(checked >= 3, "deploy/config/*.yaml: {checked} files");

    // The zone-b configuration of the reload test is valid too.
    let good = dir.join("zone-b.yaml");
    std::fs::write(&good, ZONE_B).unwrap();
    let out = kvroute_cli(&["config", "check", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("label-selector-filter"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
