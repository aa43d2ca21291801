//! KV-event faults end to end (issue 20, the fault matrix): the real `kvroute serve`
//! following three simulated vLLM pods' KV events, real Envoy in front, and a steady stream
//! of requests sharing prefixes while one pod's events are lost around a prefix-cache reset
//! (kvroute's view of it goes stale) and another pod's publisher restarts. No request is
//! lost to kvroute, each goes to a pod of the pool, the matching counters move, and once the
//! traffic stops the index holds exactly what the pods cache: as many (block, endpoint)
//! entries as the pods hold blocks, and a prefix one pod alone holds is routed there.
//!
//! Units: the pods cache 16-token blocks and kvroute runs with `--block-size 16`, so each
//! engine hash a pod reports in `/sim/cache` is one kvroute block of that endpoint (kvroute
//! rehashes the events' tokens into its own chain, one hash per engine block:
//! `kvroute_events::Applier::store`); `kvroute_kv_index_entries` then equals the sum of the
//! pods' cached hashes and `kvroute_kv_index_blocks` the size of their union.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use kvroute_sim::server::Bound;
use tokio_util::sync::CancellationToken;

/// Tokens of each tenant's shared document: 20 blocks.
const DOC_TOKENS: u32 = 320;
/// Tenants whose documents the traffic shares.
const TENANTS: u32 = 5;

/// One request of a [`Load`], as the client saw it.
#[derive(Clone, Debug)]
struct Answer {
    id: String,
    started: Instant,
    /// None when no answer came (connection failed or cut).
    status: Option<u16>,
    /// The body of an answer other than 200.
    error: String,
}

/// Completions through Envoy from `workers` clients, one after the other: request `n` is
/// tenant `n % 5`'s 320-token document then 20 tokens of its own, so requests share
/// prefixes and each caches one block of its own. Can be paused (to leave the pods idle).
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, paused, busy, sent, answers) = (
                    stop.clone(),
                    paused.clone(),
                    busy.clone(),
                    sent.clone(),
                    answers.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        // Busy first, then the pause flag: `pause` sets the flag, then waits
                        // for no worker to be busy, so none sends once it returns.
                        busy.fetch_add(1, Ordering::SeqCst);
                        if paused.load(Ordering::SeqCst) {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        let n = sent.fetch_add(1, Ordering::SeqCst) as u32;
                        let tenant = n % TENANTS;
                        let mut prompt: Vec<u32> =
                            (tenant * 1_000..tenant * 1_000 + DOC_TOKENS).collect();
                        prompt.extend((0..20).map(|i| 100_000 + n * 20 + i));
                        let id = format!("load-{n}");
                        let started = Instant::now();
                        let reply = test_support::http::try_request(
                            SocketAddr::from(([127, 0, 0, 1], port)),
                            "POST",
                            "/v1/completions",
                            &[("x-request-id", &id)],
                            completion(&prompt),
                        )
                        .await;
                        let (status, error) = match reply {
                            Ok(r) if r.status == 200 => (Some(200), String::new()),
                            Ok(r) => (Some(r.status), r.text()),
                            Err(e) => (None, e.to_string()),
                        };
                        answers.lock().unwrap().push(Answer {
                            id,
                            started,
                            status,
                            error,
                        });
                        busy.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self {
            stop,
            paused,
            busy,
            sent,
            answers,
            tasks,
        }
    }

    fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Stops sending new requests and waits until every one sent has come back.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let idle = eventually(Duration::from_secs(30), async || {
            self.busy.load(Ordering::SeqCst) == 0
        })
        .await;
        assert!(idle, "requests in flight for 30 s");
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops sending, waits for the requests in flight, and returns how many were sent and
    /// every answer.
    async fn stop(self) -> (usize, Vec<Answer>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let sent = self.sent.load(Ordering::SeqCst);
        let answers = std::mem::take(&mut *self.answers.lock().unwrap());
        (sent, answers)
    }
}

/// Three simulated pods sharing their ports, kvroute following their KV events (and
/// replaying from them with `replay`), Envoy in front.
struct Pool {
    stop: CancellationToken,
    pods: Vec<Bound>,
    kvroute: Kvroute,
    envoy: Envoy,
    /// Last, so it goes once the processes writing there have.
    _dir: Scratch,
}

impl Pool {
    async fn start(name: &str, replay: bool) -> Self {
        let dir = scratch(name);
        let stop = CancellationToken::new();
        let pods = pool_pods(3, 100.0, &stop).await;
        let list: Vec<String> = pods.iter().map(|p| p.http.to_string()).collect();
        let events = pods[0].events.port().to_string();
        let replay_port = pods[0].replay.port().to_string();
        let mut args = vec![
            "--kv-events-port",
            events.as_str(),
            "--block-size",
            "16",
            "--refresh-metrics-interval",
            "50ms",
        ];
        if replay {
            args.extend(["--kv-replay-port", replay_port.as_str()]);
        }
        let kvroute = Kvroute::start(&dir, &list.join(","), &args).await;
        let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.http).collect();
        let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
        let pool = Self {
            stop,
            pods,
            kvroute,
            envoy,
            _dir: dir,
        };
        // Without a replay, what a pod publishes before kvroute's subscription reaches it is
        // lost for good (ZMQ's slow joiner): reset each (still empty) cache, which publishes
        // a batch of no blocks, until kvroute has seen one.
        for pod in &pool.pods {
            let key = format!(
                "kvroute_endpoint_kv_events_confirmed{{endpoint=\"{}\"}}",
                pod.http
            );
            let mut confirmed = false;
            for _ in 0..40 {
                let r = test_support::http::request(
                    pod.http,
                    "POST",
                    "/reset_prefix_cache",
                    &[],
                    Vec::new(),
                )
                .await;
                assert_eq!(r.status, 200);
                confirmed = eventually(Duration::from_millis(500), async || {
                    sample(&pool.kvroute.metrics().await, &key) == 1.0
                })
                .await;
                if confirmed {
                    break;
                }
            }
            assert!(
                confirmed,
                "{} never followed: {}",
                pod.http,
                pool.kvroute.log_text()
            );
        }
        pool
    }

    async fn metric(&self, key: &str) -> f64 {
        sample(&self.kvroute.metrics().await, key)
    }

    /// Sends `tokens` to pod `home` directly (kvroute does not see the request), answered 200.
    async fn direct(&self, home: usize, tokens: &[u32]) {
        let r = test_support::http::request(
            self.pods[home].http,
            "POST",
            "/v1/completions",
            &[],
            completion(tokens),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Waits (20 s at most) until kvroute's index holds what the pods cache: as many
    /// entries as cached blocks over the pods, as many blocks as distinct ones. Returns
    /// whether it did, and the last `(entries, blocks)` of each side.
    async fn converges(&self) -> (bool, [(f64, f64); 2]) {
        let mut seen = [(0.0, 0.0); 2];
        let ok = eventually(Duration::from_secs(20), async || {
            let mut total = 0;
            let mut distinct = HashSet::new();
            for pod in &self.pods {
                let cache = sim_cache(pod).await;
                total += cache.len();
                distinct.extend(cache);
            }
            let m = self.kvroute.metrics().await;
            seen = [
                (
                    sample(&m, "kvroute_kv_index_entries"),
                    sample(&m, "kvroute_kv_index_blocks"),
                ),
                (total as f64, distinct.len() as f64),
            ];
            seen[0] == seen[1]
        })
        .await;
        (ok, seen)
    }

    /// Caches 256-token `document` on `pods` (sent to each directly) and waits until
    /// kvroute has seen its blocks stored.
    async fn cache_document(&self, pods: &[usize], document: &[u32]) {
        let stored_before = stored_blocks(&self.kvroute).await;
        for &home in pods {
            self.direct(home, document).await;
        }
        let want = stored_before + 16.0 * pods.len() as f64;
        let seen = eventually(Duration::from_secs(10), async || {
            stored_blocks(&self.kvroute).await >= want
        })
        .await;
        assert!(seen, "{}", self.kvroute.metrics().await);
    }

    /// `document` with a question through Envoy: returns the pod Envoy sent it to and the
    /// prompt tokens pod `home` served from its cache meanwhile.
    async fn ask(&self, document: &[u32], home: usize) -> (String, f64) {
        let hits_before = pod_counter(&self.pods[home], "vllm:prefix_cache_hits_total").await;
        let mut asked = document.to_vec();
        asked.extend(990_000..990_020);
        let id = format!("document-{}-{}", document[0], unique());
        let reply = http(
            self.envoy.port,
            "POST",
            "/v1/completions",
            &[("x-request-id", &id)],
            completion(&asked),
        )
        .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let hits = pod_counter(&self.pods[home], "vllm:prefix_cache_hits_total").await;
        let mut upstream = String::new();
        let logged = eventually(Duration::from_secs(5), async || {
            upstream = self.envoy.upstreams().remove(&id).unwrap_or_default();
            !upstream.is_empty()
        })
        .await;
        assert!(logged, "{id} not in Envoy's access log");
        (upstream, hits - hits_before)
    }

    /// Asserts that `document` with a question goes to pod `home` and is served from its
    /// cache.
    async fn routed_home(&self, document: &[u32], home: usize) {
        let (upstream, hits) = self.ask(document, home).await;
        assert_eq!(
            upstream,
            self.pods[home].http.to_string(),
            "a document only pod {home} holds went elsewhere: {}",
            self.kvroute.log_text()
        );
        assert_eq!(hits, 256.0, "pod {home} served the document from its cache");
    }
}

fn document(base: u32) -> Vec<u32> {
    (base..base + 256).collect()
}

const GAPS: &str = "kvroute_kv_event_resyncs_total{cause=\"gap\"}";
const RESTARTS: &str = "kvroute_kv_event_resyncs_total{cause=\"restart\"}";
const DUPLICATES: &str = "kvroute_kv_event_batches_total{outcome=\"duplicate\"}";

/// The scenario, with or without a replay socket for kvroute to fill gaps from.
#[allow(clippy::print_stdout, reason = "a test's report, as in test functions")]
async fn faults_under_load(name: &str, replay: bool) {
    let begin = Instant::now();
    let pool = Pool::start(name, replay).await;
    let load = Load::start(pool.envoy.port, 4);
    let warm = eventually(Duration::from_secs(20), async || load.answered() >= 200).await;
    assert!(warm, "traffic does not flow: {}", pool.kvroute.log_text());
    // A document all three pods cache: the gap's reset and the restart take it from pods 0
    // and 1, and kvroute must then send it to pod 2 alone (believing the old copies, it
    // would see a three-way tie).
    let stale = document(900_000);
    pool.cache_document(&[0, 1, 2], &stale).await;
    let gaps_before = pool.metric(GAPS).await;
    let restarts_before = pool.metric(RESTARTS).await;
    let duplicates_before = pool.metric(DUPLICATES).await;

    // (a) A gap: pod 0's events are lost while it caches documents, then its cache is reset
    // (kvroute's view of it goes stale: it still believes what the pod cached before the
    // fault is there), then its events flow again.
    set_fault(&pool.pods[0], "drop-events").await;
    for d in 0..3 {
        pool.direct(0, &document(200_000 + d * 1_000)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !replay {
        // Without a replay, blocks the pod caches between the reset and the end of the fault
        // are published to no one and never again: kvroute cannot learn of them, so the
        // index could not converge to the pod's cache. The traffic pauses (every request
        // answered, the pod idle) for the two calls.
        load.pause().await;
    }
    let r = test_support::http::request(
        pool.pods[0].http,
        "POST",
        "/reset_prefix_cache",
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    set_fault(&pool.pods[0], "none").await;
    load.resume();
    // A live batch that shows the gap, whatever the traffic does.
    pool.direct(0, &document(300_000)).await;
    let noticed = eventually(Duration::from_secs(10), async || {
        if replay {
            // Filled: the replay brought the lost batches, and the live batch that showed
            // the gap then came as a duplicate.
            pool.metric(DUPLICATES).await > duplicates_before
        } else {
            pool.metric(GAPS).await > gaps_before
        }
    })
    .await;
    assert!(
        noticed,
        "the gap went unnoticed: {}",
        pool.kvroute.metrics().await
    );

    // (b) Pod 1's publisher restarts: empty cache, sequence numbers from 0.
    let restart_sent = Instant::now();
    set_fault(&pool.pods[1], "restart").await;
    let restarted = Instant::now();
    pool.direct(1, &document(400_000)).await;
    let noticed = eventually(Duration::from_secs(10), async || {
        pool.metric(RESTARTS).await > restarts_before
    })
    .await;
    assert!(
        noticed,
        "the restart went unnoticed: {}",
        pool.kvroute.metrics().await
    );
    // A document every pod caches: its blocks are entries of three endpoints (the traffic
    // keeps each tenant on one pod), so kvroute's entries are more than its blocks.
    for home in 0..3 {
        pool.direct(home, &document(800_000)).await;
    }
    let after = load.answered();
    let more = eventually(Duration::from_secs(20), async || {
        load.answered() >= after + 200
    })
    .await;
    assert!(more, "traffic stopped after the faults");

    let (sent, answers) = load.stop().await;
    assert_eq!(answers.len(), sent, "every request came back");
    let addrs: HashSet<String> = pool.pods.iter().map(|p| p.http.to_string()).collect();
    let restarted_pod = pool.pods[1].http.to_string();
    let mut ups = std::collections::HashMap::new();
    let logged = eventually(Duration::from_secs(10), async || {
        ups = pool.envoy.upstreams();
        answers.iter().all(|a| ups.contains_key(&a.id))
    })
    .await;
    assert!(logged, "access log incomplete");
    let mut aborted = 0;
    for a in &answers {
        let up = &ups[&a.id];
        assert!(
            addrs.contains(up),
            "{} went to {up:?}, not a pod of the pool: {a:?}",
            a.id
        );
        if a.status == Some(200) {
            continue;
        }
        // The one loss kvroute cannot prevent: a restarting engine drops what it was
        // running (the simulator answers 503), as a vLLM process that restarts does.
        assert!(
            a.status == Some(503)
                && *up == restarted_pod
                && a.started < restarted
                && a.error.contains("engine restarted"),
            "lost: {a:?} via {up} (restart sent {:?} after the start)",
            restart_sent - begin
        );
        aborted += 1;
    }
    println!(
        "{sent} requests: {} answered 200, {aborted} dropped by the restarting pod",
        sent - aborted
    );

    // Once the traffic stops, the index holds what the pods cache.
    let (converged, [kvroute, pods]) = pool.converges().await;
    println!(
        "index (entries, blocks) {kvroute:?}, pods (cached, distinct) {pods:?}, after {:?}",
        begin.elapsed()
    );
    assert!(
        converged,
        "kvroute holds (entries, blocks) {kvroute:?}, the pods cache {pods:?}\n{}",
        pool.kvroute.metrics().await
    );
    let m = pool.kvroute.metrics().await;
    let want_gaps = if replay {
        gaps_before
    } else {
        gaps_before + 1.0
    };
    assert_eq!(sample(&m, GAPS), want_gaps, "{m}");
    assert_eq!(sample(&m, RESTARTS), restarts_before + 1.0, "{m}");

    // A prefix one pod alone holds goes to that pod: the copy the faults left, then a new
    // document on the pod that had the gap, the one that restarted, and one that had
    // neither.
    pool.routed_home(&stale, 2).await;
    for (home, base) in [(0, 500_000), (1, 600_000), (2, 700_000)] {
        let fresh = document(base);
        pool.cache_document(&[home], &fresh).await;
        pool.routed_home(&fresh, home).await;
    }
    let (converged, [kvroute, pods]) = pool.converges().await;
    assert!(converged, "{kvroute:?} != {pods:?}");
    println!("took {:?}", begin.elapsed());
    pool.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_without_replay_and_a_publisher_restart_under_load() {
    faults_under_load("faults-no-replay", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_filled_by_replay_and_a_publisher_restart_under_load() {
    faults_under_load("faults-replay", true).await;
}
