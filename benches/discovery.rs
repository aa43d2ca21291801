//! Discovery's own cost in the real `kvroute serve --pool-name` process, against the
//! in-process API server (`test_support::apiserver`, reached through a kubeconfig): time
//! from start to a full endpoint set, resident memory and CPU with 1,000 pods (against one
//! pod), and CPU per pod event under churn. Scrapes are pushed out to one an hour, so what
//! is measured is discovery and the endpoint registry, not the pods' `/metrics`.
//!
//! `cargo bench --bench discovery [-- PODS CHURN_EVENTS]` (defaults 1,000 and 2,000).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::apiserver::{ApiServer, Resource, inference_pool, pod};

const NS: &str = "llm";

fn ip(i: usize) -> String {
    format!("127.1.{}.{}", i / 250, i % 250 + 1)
}

fn vllm(i: usize, ready: bool) -> serde_json::Value {
    pod(
        NS,
        &format!("pod-{i:05}"),
        &ip(i),
        &[("app", "vllm")],
        ready,
    )
}

/// CPU seconds (user + system) and resident KiB of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted from the state field (3rd).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks as f64 / 100.0, rss)
}

async fn endpoints_gauge(admin: u16) -> Option<usize> {
    let reply = test_support::http::try_request(
        ([127, 0, 0, 1], admin).into(),
        "GET",
        "/metrics",
        &[],
        Vec::new(),
    )
    .await
    .ok()?;
    reply
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("kvroute_endpoints "))
        .and_then(|v| v.trim().parse().ok())
}

struct Kvroute {
    child: Child,
    admin: u16,
}

impl Drop for Kvroute {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(dir: &std::path::Path, kubeconfig: &std::path::Path) -> Kvroute {
    let log = dir.join("kvroute.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args([
            "--worker-threads",
            "1",
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--grpc-health-port",
            "0",
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--refresh-metrics-interval",
            "3600s",
        ])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let admin = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(port) = text
            .lines()
            .find(|l| l.contains("kvroute serving"))
            .and_then(|l| {
                let at = l.find("admin=")? + "admin=".len();
                l[at..]
                    .split([' ', '"'])
                    .next()?
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.port())
            })
        {
            break port;
        }
        assert!(Instant::now() < deadline, "kvroute did not start: {text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Kvroute { child, admin }
}

async fn until_endpoints(k: &Kvroute, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while endpoints_gauge(k.admin).await != Some(n) {
        assert!(Instant::now() < deadline, "never reached {n} endpoints");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let pods = args.first().copied().unwrap_or(1_000);
    let churn = args.get(1).copied().unwrap_or(2_000);
    let dir = std::env::temp_dir().join(format!("kvroute-discovery-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    println!("| pods | start to full endpoint set | RSS after the list | CPU to list |");
    println!("|---|---|---|---|");
    let mut last = None;
    for n in [1, pods] {
        let api = ApiServer::start().await;
        api.install(Resource::inference_pool());
        api.apply(
            &Resource::inference_pool(),
            inference_pool(NS, "pool", &[("app", "vllm")], &[8000]),
        );
        for i in 0..n {
            api.apply(&Resource::pods(), vllm(i, true));
        }
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig(NS)).unwrap();
        let started = Instant::now();
        let k = start(&dir, &kubeconfig).await;
        until_endpoints(&k, n).await;
        let listed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (cpu, rss) = usage(k.child.id());
        println!(
            "| {n} | {:.0} ms | {:.1} MiB | {:.0} ms |",
            listed.as_secs_f64() * 1e3,
            rss as f64 / 1024.0,
            cpu * 1e3
        );
        last = Some((api, k));
    }
    let (api, k) = last.unwrap();

    // Churn: pods flip between ready and not ready, 500 events a second.
    let (cpu0, _) = usage(k.child.id());
    let started = Instant::now();
    let mut ready = vec![true; pods];
    for e in 0..churn {
        let i = (e * 7_919) % pods;
        ready[i] = !ready[i];
        api.apply(&Resource::pods(), vllm(i, ready[i]));
        tokio::time::sleep_until(
            (started + Duration::from_micros(2_000 * e as u64 + 2_000)).into(),
        )
        .await;
    }
    let want = ready.iter().filter(|r| **r).count();
    until_endpoints(&k, want).await;
    let took = started.elapsed();
    let (cpu1, rss) = usage(k.child.id());
    println!();
    println!(
        "churn: {churn} pod events at 500/s over {pods} pods: converged {:.0} ms after the first, kvroute CPU {:.1} µs per event ({:.1}% of a core), RSS after {:.1} MiB",
        took.as_secs_f64() * 1e3,
        (cpu1 - cpu0) * 1e6 / churn as f64,
        (cpu1 - cpu0) / took.as_secs_f64() * 100.0,
        rss as f64 / 1024.0
    );
    drop(k);
    let _ = std::fs::remove_dir_all(&dir);
}
