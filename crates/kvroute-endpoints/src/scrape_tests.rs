//! The scraper over real sockets: the simulator's `/metrics`, and pods that hang, answer
//! garbage, answer 500, announce or stream an endless body; endpoints leaving; shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU8, Ordering};

use kvroute_core::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::{Health, HealthConfig};

const VLLM: &str = include_str!("../testdata/vllm.txt");

/// How a test pod answers each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Metrics,
    Hang,
    Garbage,
    Error,
    HugeLength,
    Endless,
}

/// A pod whose behaviour the test switches; serves until the test's runtime ends.
struct Pod {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
}

impl Pod {
    async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let m = Arc::clone(&mode);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, Arc::clone(&m)));
            }
        });
        Self { addr, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

async fn serve(mut conn: TcpStream, mode: Arc<AtomicU8>) {
    let mut buf = Vec::new();
    loop {
        // Read one request head.
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.clear();
        let mode = mode.load(Ordering::SeqCst);
        let reply = |status: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let written = match mode {
            m if m == Mode::Metrics as u8 => conn.write_all(reply("200 OK", VLLM).as_bytes()).await,
            m if m == Mode::Garbage as u8 => {
                conn.write_all(reply("200 OK", "<html>It works!</html>").as_bytes())
                    .await
            }
            m if m == Mode::Error as u8 => {
                conn.write_all(reply("500 Internal Server Error", "oops").as_bytes())
                    .await
            }
            m if m == Mode::HugeLength as u8 => {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n";
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&[b'x'; 4096]).await;
                std::future::pending().await
            }
            m if m == Mode::Endless as u8 => {
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                let _ = conn.write_all(head.as_bytes()).await;
                let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                while conn.write_all(chunk.as_bytes()).await.is_ok() {}
                return;
            }
            _ => std::future::pending().await,
        };
        if written.is_err() {
            return;
        }
    }
}

fn config() -> ScrapeConfig {
    ScrapeConfig {
        interval: Duration::from_millis(20),
        staleness: Duration::from_millis(300),
        timeout: Duration::from_millis(150),
        ..ScrapeConfig::default()
    }
}

fn registry(addrs: &[SocketAddr], health: HealthConfig) -> Arc<Registry> {
    let reg = Arc::new(Registry::with_health(health));
    reg.replace(addrs.iter().map(|a| Endpoint::from_address(*a)).collect());
    reg
}

/// Starts a scraper; returns its metrics, its token and its task.
fn spawn(
    config: ScrapeConfig,
    reg: &Arc<Registry>,
) -> (ScrapeMetrics, CancellationToken, JoinHandle<()>) {
    let metrics = ScrapeMetrics::default();
    let token = CancellationToken::new();
    let scraper = Scraper::new(config, metrics.clone());
    let task = tokio::spawn(scraper.run(Arc::clone(reg), token.clone()));
    (metrics, token, task)
}

async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

async fn stop(token: CancellationToken, task: JoinHandle<()>) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the run loop ends promptly")
        .unwrap();
}

#[tokio::test]
async fn scrapes_the_simulator() {
    use kvroute_sim::server::{self, ServerConfig};
    let sim_stop = CancellationToken::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let profile = kvroute_sim::Profile::h100_llama31_8b().with_max_loras(2);
    let block = u32::try_from(profile.block_size).unwrap();
    let bound = server::start(
        ServerConfig {
            http: any,
            events: any,
            replay: any,
            topic: "kv@sim@m".into(),
            model: "m".into(),
            profile,
            // Slow enough (steps of ~100 ms) that a request is seen running for seconds.
            speed: 0.05,
            encoding: kvroute_sim::wire::EventEncoding::Map,
            tokenizer: None,
            chat_template: None,
            pd: kvroute_sim::server::PdConfig::default(),
            lora_adapters: vec!["sql".into()],
            force_include_usage: false,
        },
        sim_stop.clone(),
    )
    .await
    .unwrap();
    let reg = registry(&[bound.http], HealthConfig::default());
    let ep = Arc::clone(&reg.snapshot()[0]);
    let (metrics, token, task) = spawn(
        ScrapeConfig {
            expected_block_size: Some(block + 1),
            ..config()
        },
        &reg,
    );
    assert!(eventually(|| ep.scraped().is_some()).await, "first scrape");
    let load = ep.fresh_load(Instant::now(), config().staleness).unwrap();
    assert_eq!((load.running, load.waiting), (0, 0));
    assert_eq!(load.block_size, Some(block));
    assert_eq!(load.max_lora, Some(2));
    assert!(load.running_loras.is_empty() && load.waiting_loras.is_empty());
    drop(load);

    // One request in flight, for an adapter, shows up in the next scrapes.
    let body = r#"{"model":"sql","prompt":"hello there","max_tokens":200}"#;
    let mut client = TcpStream::connect(bound.http).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    assert!(
        eventually(|| ep
            .fresh_load(Instant::now(), config().staleness)
            .is_some_and(|l| l.running == 1 && l.kv_usage > 0.0 && l.running_loras == ["sql"]))
        .await,
        "{:?}",
        ep.scraped()
    );
    assert_eq!(ep.scrape_errors(), 0);
    assert!(metrics.scrapes("ok") >= 2);
    assert_eq!(ep.health(Instant::now()), Health::Healthy);
    stop(token, task).await;
    sim_stop.cancel();
}

#[tokio::test]
async fn a_hung_pod_times_out_and_its_load_goes_stale() {
    let pod = Pod::start(Mode::Metrics).await;
    let reg = registry(&[pod.addr], HealthConfig::default());
    let ep = Arc::clone(&reg.snapshot()[0]);
    let (metrics, token, task) = spawn(config(), &reg);
    assert!(eventually(|| ep.scraped().is_some()).await);
    assert_eq!(ep.scraped().as_ref().unwrap().load.running, 12);
    pod.set(Mode::Hang);
    let hung_at = Instant::now();
    assert!(eventually(|| metrics.scrapes("timeout") >= 2).await);
    assert!(ep.scrape_errors() >= 2);
    assert!(
        hung_at.elapsed() >= config().timeout,
        "errors only after the timeout"
    );
    assert!(
        eventually(|| ep.fresh_load(Instant::now(), config().staleness).is_none()).await,
        "stale after the staleness threshold"
    );
    assert!(ep.scraped().is_some(), "the last scrape is kept");
    assert_eq!(metrics.scrapes("parse"), 0);
    stop(token, task).await;
}

#[tokio::test]
async fn garbage_is_an_error_and_leaves_the_load_unknown() {
    let pod = Pod::start(Mode::Metrics).await;
    let reg = registry(&[pod.addr], HealthConfig::default());
    let ep = Arc::clone(&reg.snapshot()[0]);
    let (metrics, token, task) = spawn(config(), &reg);
    assert!(eventually(|| ep.scraped().is_some()).await);
    pod.set(Mode::Garbage);
    assert!(eventually(|| metrics.scrapes("parse") >= 3).await);
    // The last good scrape is kept but ages out; the pod is not failing for it.
    assert!(ep.scraped().is_some());
    let stale = Duration::from_millis(150);
    assert!(eventually(|| ep.fresh_load(Instant::now(), stale).is_none()).await);
    assert_eq!(ep.health(Instant::now()), Health::Healthy);
    assert!(ep.scrape_errors() >= 3);
    stop(token, task).await;
}

#[tokio::test]
async fn failing_scrapes_never_eject_only_failing_requests_do() {
    let pod = Pod::start(Mode::Error).await;
    let health = HealthConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_millis(200),
        max_ejection: Duration::from_secs(1),
    };
    let reg = registry(&[pod.addr], health);
    let ep = Arc::clone(&reg.snapshot()[0]);
    let (metrics, token, task) = spawn(config(), &reg);
    // A /metrics answering 500 (or timing out while the API serves) is a load unknown.
    assert!(eventually(|| metrics.scrapes("status") >= 5).await);
    assert_eq!(ep.health(Instant::now()), Health::Healthy);
    assert_eq!(ep.ejections(), 0);
    // Requests that fail eject it; scrapes that succeed do not bring it back early.
    pod.set(Mode::Metrics);
    for _ in 0..3 {
        ep.record_outcome(false, Instant::now());
    }
    assert_eq!(ep.health(Instant::now()), Health::Ejected);
    assert!(eventually(|| ep.scraped().is_some()).await);
    assert!(
        eventually(|| ep.health(Instant::now()) != Health::Ejected).await,
        "let back after its ejection time"
    );
    ep.record_outcome(true, Instant::now());
    assert_eq!(ep.health(Instant::now()), Health::Healthy);
    assert_eq!(ep.ejections(), 1);
    stop(token, task).await;
}

#[tokio::test]
async fn bodies_are_capped() {
    for mode in [Mode::HugeLength, Mode::Endless] {
        let pod = Pod::start(mode).await;
        let reg = registry(&[pod.addr], HealthConfig::default());
        let (metrics, token, task) = spawn(
            ScrapeConfig {
                max_body_bytes: 256 << 10,
                timeout: Duration::from_secs(30),
                ..config()
            },
            &reg,
        );
        assert!(
            eventually(|| metrics.scrapes("too_large") >= 2).await,
            "{mode:?}: the cap, not the 30 s timeout, ends it"
        );
        assert_eq!(metrics.scrapes("timeout"), 0);
        stop(token, task).await;
    }
}

#[tokio::test]
async fn departed_endpoints_stop_being_scraped() {
    let a = Pod::start(Mode::Metrics).await;
    let b = Pod::start(Mode::Metrics).await;
    let reg = registry(&[a.addr, b.addr], HealthConfig::default());
    let snap = reg.snapshot();
    let (metrics, token, task) = spawn(config(), &reg);
    assert!(eventually(|| snap.iter().all(|e| e.scraped().is_some())).await);
    let gone = Arc::clone(&snap[1]);
    let kept = Arc::clone(&snap[0]);
    drop(snap);
    reg.replace(vec![Endpoint::from_address(kept.address())]);
    assert!(
        eventually(|| Arc::strong_count(&gone) == 1).await,
        "its task ended and let go of it"
    );
    let at = gone.scraped().as_ref().unwrap().at;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gone.scraped().as_ref().unwrap().at, at, "no scrape since");
    let before = metrics.scrapes("ok");
    assert!(
        eventually(|| metrics.scrapes("ok") > before + 2).await,
        "the other goes on"
    );
    stop(token, task).await;
}

#[tokio::test]
async fn cancel_ends_the_loop_mid_scrape() {
    let pod = Pod::start(Mode::Hang).await;
    let reg = registry(&[pod.addr], HealthConfig::default());
    let ep = Arc::clone(&reg.snapshot()[0]);
    let (_, token, task) = spawn(
        ScrapeConfig {
            timeout: Duration::from_secs(60),
            ..config()
        },
        &reg,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(token, task).await;
    assert_eq!(
        Arc::strong_count(&ep),
        2,
        "the registry's and ours: the task is gone"
    );
}

#[test]
fn config_is_checked() {
    assert!(ScrapeConfig::default().validate().is_ok());
    let zero = ScrapeConfig {
        interval: Duration::ZERO,
        ..ScrapeConfig::default()
    };
    assert!(zero.validate().is_err());
    let path = ScrapeConfig {
        path: "metrics".into(),
        ..ScrapeConfig::default()
    };
    assert!(path.validate().is_err());
}
