//! CPU the scrape loop costs at 1,000 endpoints.
//!
//! The bench re-runs itself as a child process that serves a realistic vLLM `/metrics` body
//! (`testdata/vllm.txt`: 37 series, histograms and LoRA info included, ~6.6 KB) on 1,000
//! loopback ports, so the servers' CPU is not the scraper's. The parent runs the `Scraper`
//! at the default 50 ms interval for a warm-up and then `SECONDS` seconds, and reports the
//! CPU its process used (user + system, from `/proc/self/stat`) per wall second and per
//! scrape. Linux only; `/proc` rather than `getrusage` because the workspace forbids `unsafe`.
//!
//! `cargo bench -p kvroute-endpoints --bench scrape` (env: `ENDPOINTS`, default 1000;
//! `SECONDS`, default 10).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::convert::Infallible;
use std::error::Error;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kvroute_core::Endpoint;
use kvroute_endpoints::{Registry, ScrapeConfig, ScrapeMetrics, Scraper};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BODY: &str = include_str!("../testdata/vllm.txt");
const SERVE: &str = "KVROUTE_SCRAPE_BENCH_SERVE";
/// `USER_HZ`: the unit of `/proc/*/stat` CPU times, 100 on every Linux kvroute targets.
const TICKS_PER_SECOND: f64 = 100.0;

type BoxError = Box<dyn Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    if let Ok(n) = std::env::var(SERVE) {
        return serve(n.parse()?);
    }
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and `cargo test --benches`: nothing to list.
        return Ok(());
    }
    let endpoints: usize = env("ENDPOINTS", 1000)?;
    let seconds: u64 = env("SECONDS", 10)?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(SERVE, endpoints.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addrs: Vec<SocketAddr> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let result = tokio::runtime::Runtime::new()?.block_on(measure(addrs, seconds, child.id()));
    child.kill()?;
    child.wait()?;
    result
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: Error + Send + Sync + 'static,
{
    Ok(match std::env::var(name) {
        Ok(v) => v.parse()?,
        Err(_) => default,
    })
}

async fn measure(addrs: Vec<SocketAddr>, seconds: u64, child: u32) -> Result<(), BoxError> {
    let n = addrs.len();
    let registry = Arc::new(Registry::new());
    registry.replace(addrs.into_iter().map(Endpoint::from_address).collect());
    let metrics = ScrapeMetrics::default();
    let token = CancellationToken::new();
    let config = ScrapeConfig::default();
    let interval = config.interval;
    let task = tokio::spawn(
        Scraper::new(config, metrics.clone()).run(Arc::clone(&registry), token.clone()),
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, child0, ok0, t0) = (
        cpu("self")?,
        cpu(&child.to_string())?,
        metrics.scrapes("ok"),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, child1, ok1, wall) = (
        cpu("self")?,
        cpu(&child.to_string())?,
        metrics.scrapes("ok"),
        t0.elapsed(),
    );
    token.cancel();
    task.await?;

    let errors: u64 = ["connect", "http", "timeout", "status", "too_large", "parse"]
        .iter()
        .map(|o| metrics.scrapes(o))
        .sum();
    let scrapes = ok1 - ok0;
    let wall = wall.as_secs_f64();
    let used = cpu1 - cpu0;
    println!(
        "endpoints {n}, interval {interval:?}, body {} bytes, measured {wall:.1} s",
        BODY.len()
    );
    println!(
        "scrapes: {scrapes} ok ({:.0}/s, ideal {:.0}/s), {errors} errors",
        scrapes as f64 / wall,
        n as f64 / interval.as_secs_f64()
    );
    println!(
        "scraper CPU: {:.3} s per second ({:.1}% of one core), {:.1} us per scrape",
        used / wall,
        100.0 * used / wall,
        1e6 * used / scrapes.max(1) as f64
    );
    println!(
        "(servers, in the child process: {:.3} CPU s per second)",
        (child1 - child0) / wall
    );
    Ok(())
}

/// User + system CPU seconds of a process, all threads, from `/proc/<pid>/stat`.
fn cpu(pid: &str) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).ok_or("short stat")?.parse::<u64>()?
        + fields.get(12).ok_or("short stat")?.parse::<u64>()?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// The child: `n` listeners answering every request with `BODY`, until the parent kills it.
fn serve(n: usize) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut addrs = Vec::with_capacity(n);
        let body = Bytes::from_static(BODY.as_bytes());
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?.to_string());
            let body = body.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let body = body.clone();
                    let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
        }
        println!("{}", addrs.join(" "));
        std::future::pending::<()>().await;
        Ok(())
    })
}
