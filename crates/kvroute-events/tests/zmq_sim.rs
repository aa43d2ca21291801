//! The subscriber against simulated vLLM pods over real ZMQ: after any workload, once the
//! events drain, the index holds exactly what the pod's cache holds; dropped messages, a
//! publisher restart and a pod that dies and comes back each end in a correct index; a pod
//! that leaves takes its entries with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvroute_core::{BlockHash, Endpoint, EndpointId};
use kvroute_endpoints::Registry;
use kvroute_events::{EventMetrics, SubscriberConfig, Subscriptions};
use kvroute_index::{PrefixIndex, Shared};
use kvroute_sim::Profile;
use kvroute_sim::server::{self, Bound, ServerConfig};
use kvroute_sim::wire::EventEncoding;
use kvroute_tokens::{BlockHasher, ExtraKeys};
use proptest::prelude::*;
use test_support::http::{eventually, request};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The simulator's tiny profile: 4-token blocks, room for 24 of them, so workloads evict.
fn profile() -> Profile {
    Profile::tiny(24, 4, 64)
}

const BS: usize = 4;

/// The root of the simulator's engine hash chains (vLLM's `NONE_HASH`, fixed), and its
/// hash of an explicit block: XXH3 of the tokens' little-endian bytes, seeded by the parent.
const SIM_ROOT: u64 = 0x766c_6c6d_5f6e_6f6e;

fn engine_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut parent = SIM_ROOT;
    tokens
        .chunks_exact(BS)
        .map(|b| {
            let bytes: Vec<u8> = b.iter().flat_map(|t| t.to_le_bytes()).collect();
            parent = xxh3_64_with_seed(&bytes, parent);
            parent
        })
        .collect()
}

async fn start_sim(at: Option<Bound>, encoding: EventEncoding) -> (Bound, CancellationToken) {
    let (bound, stop) = start_sim_on([127, 0, 0, 1], at, encoding).await.unwrap();
    (bound, stop)
}

/// A pod on loopback address `ip`, on `at`'s ports (a pool's pods share their event ports)
/// or on free ones.
async fn start_sim_on(
    ip: [u8; 4],
    at: Option<Bound>,
    encoding: EventEncoding,
) -> Result<(Bound, CancellationToken), server::StartError> {
    let stop = CancellationToken::new();
    let port = |p: fn(&Bound) -> SocketAddr| SocketAddr::from((ip, at.map_or(0, |b| p(&b).port())));
    let bound = server::start(
        ServerConfig {
            http: port(|b| b.http),
            events: port(|b| b.events),
            replay: port(|b| b.replay),
            topic: "kv@pod@m".into(),
            model: "m".into(),
            profile: profile(),
            speed: 1000.0,
            encoding,
            tokenizer: None,
            chat_template: None,
            pd: kvroute_sim::server::PdConfig::default(),
            lora_adapters: Vec::new(),
            force_include_usage: false,
        },
        stop.clone(),
    )
    .await?;
    Ok((bound, stop))
}

/// Pods followed by kvroute: the registry, the index, and the subscriptions' stop.
struct Followed {
    registry: Arc<Registry>,
    index: Arc<Shared<PrefixIndex>>,
    /// The endpoints, in the order their pods were given; the first is `id`.
    ids: Vec<EndpointId>,
    id: EndpointId,
    stop: CancellationToken,
    prom: prometheus_client::registry::Registry,
}

fn follow(bound: &Bound, replay: bool) -> Followed {
    follow_with(bound, replay, Duration::from_secs(5))
}

fn follow_with(bound: &Bound, replay: bool, silence: Duration) -> Followed {
    follow_all(std::slice::from_ref(bound), replay, silence)
}

fn follow_all(pods: &[Bound], replay: bool, silence: Duration) -> Followed {
    let bound = &pods[0];
    let registry = Arc::new(Registry::new());
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::from_address(p.http))
        .collect();
    let ids: Vec<EndpointId> = endpoints.iter().map(|e| e.id.clone()).collect();
    let id = ids[0].clone();
    registry.replace(endpoints);
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
    let metrics = EventMetrics::register(&mut prom);
    let config = SubscriberConfig {
        port: bound.events.port(),
        replay_port: replay.then_some(bound.replay.port()),
        topic: "kv@".into(),
        block_size: BS,
        silence,
        replay_timeout: Duration::from_secs(1),
        join_replay: JOIN_REPLAY,
        ..SubscriberConfig::default()
    };
    let stop = CancellationToken::new();
    tokio::spawn(
        Subscriptions::new(config, Arc::clone(&index), metrics)
            .run(Arc::clone(&registry), stop.clone()),
    );
    Followed {
        registry,
        index,
        ids,
        id,
        stop,
        prom,
    }
}

impl Followed {
    fn confirmed(&self) -> bool {
        let eps = self.registry.snapshot();
        !eps.is_empty() && eps.iter().all(|e| e.events_confirmed())
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom).unwrap();
        out
    }

    /// A counter of kvroute's `/metrics` (`name{labels}`), 0 when absent.
    fn counter(&self, key: &str) -> u64 {
        let key = format!("{key} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map_or(0, |n| n.parse().unwrap())
    }

    /// The `kv_event_resyncs` counter for `cause`.
    fn resyncs(&self, cause: &str) -> u64 {
        self.counter(&format!(
            "kvroute_kv_event_resyncs_total{{cause=\"{cause}\"}}"
        ))
    }

    /// Blocks of `tokens` the index says the (first) pod holds, as a prefix.
    fn held(&self, tokens: &[u32]) -> usize {
        self.held_on(&self.id, tokens)
    }

    fn held_on(&self, id: &EndpointId, tokens: &[u32]) -> usize {
        let mut hashes: Vec<BlockHash> = Vec::new();
        BlockHasher::new(BS).hash_tokens(tokens, &ExtraKeys::default(), &mut hashes);
        self.index
            .read()
            .match_prefix(&hashes)
            .iter()
            .find(|m| m.endpoint == *id)
            .map_or(0, |m| m.blocks as usize)
    }

    /// Whether the index holds exactly what the (first) pod caches.
    async fn mirrors(&self, bound: &Bound, prompts: &[Vec<u32>]) -> bool {
        self.mirrors_on(&self.id, bound, prompts).await
    }

    /// Whether the index holds exactly what pod `bound` (endpoint `id`) caches: as many
    /// blocks, and for each prompt the same cached prefix.
    async fn mirrors_on(&self, id: &EndpointId, bound: &Bound, prompts: &[Vec<u32>]) -> bool {
        let reply = request(bound.http, "GET", "/sim/cache", &[], Vec::new()).await;
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let cached: std::collections::HashSet<u64> = v["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_u64().unwrap())
            .collect();
        if self.index.read().endpoint_blocks(id) != cached.len() {
            return false;
        }
        prompts.iter().all(|p| {
            let on_pod = engine_hashes(p)
                .iter()
                .take_while(|h| cached.contains(h))
                .count();
            self.held_on(id, p) == on_pod
        })
    }
}

async fn complete(bound: &Bound, prompt: &[u32]) {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 2}).to_string();
    let reply = request(
        bound.http,
        "POST",
        "/v1/completions",
        &[],
        body.into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

async fn post(bound: &Bound, path: &str, body: &str) {
    let reply = request(bound.http, "POST", path, &[], body.as_bytes().to_vec()).await;
    assert_eq!(reply.status, 200, "{path}: {}", reply.text());
}

async fn fault(bound: &Bound, fault: &str) {
    post(bound, "/sim/fault", &format!(r#"{{"fault":"{fault}"}}"#)).await;
}

/// Prompts built from shared pieces, so they share prefixes, some of a partial block.
fn prompt(pieces: &[u8]) -> Vec<u32> {
    pieces
        .iter()
        .flat_map(|&p| (0..6).map(move |i| u32::from(p) * 100 + i))
        .collect()
}

const SETTLE: Duration = Duration::from_secs(5);
/// Long enough that a test's first request surely lands before it, on a loaded machine.
const JOIN_REPLAY: Duration = Duration::from_secs(3);

async fn settles(f: &Followed, bound: &Bound, prompts: &[Vec<u32>]) -> bool {
    eventually(SETTLE, async || f.mirrors(bound, prompts).await).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Random workloads over two pods (prompts sharing prefixes sent to either, caches
    /// small enough to evict, now and then a prefix-cache reset), in either event
    /// encoding: once the events drain, the index holds exactly what each pod holds.
    #[test]
    fn the_index_mirrors_every_pod_after_any_workload(
        workload in prop::collection::vec(
            (prop::collection::vec(0u8..4, 1..6), 0u8..12, any::<bool>()),
            1..16,
        ),
        map in any::<bool>(),
    ) {
        let encoding = if map { EventEncoding::Map } else { EventEncoding::Array };
        runtime().block_on(async {
            let pods = two_pods(encoding).await;
            let f = follow_all(&pods.iter().map(|(b, _)| *b).collect::<Vec<_>>(), true, SETTLE);
            let mut prompts: [Vec<Vec<u32>>; 2] = [Vec::new(), Vec::new()];
            for (pieces, roll, second) in workload {
                let pod = usize::from(second);
                let bound = &pods[pod].0;
                if roll == 0 {
                    post(bound, "/reset_prefix_cache", "").await;
                }
                let p = prompt(&pieces);
                complete(bound, &p).await;
                prompts[pod].push(p);
            }
            for (i, (bound, _)) in pods.iter().enumerate() {
                let settled = eventually(SETTLE, async || {
                    f.mirrors_on(&f.ids[i], bound, &prompts[i]).await
                })
                .await;
                prop_assert!(settled, "pod {i}: {}", f.metrics());
            }
            // A pod sent nothing mirrors at once, before its subscription has even been
            // made: wait for every stream to be in sequence rather than assume it.
            let confirmed = eventually(SETTLE, async || f.confirmed()).await;
            prop_assert!(confirmed, "{}", f.metrics());
            f.stop.cancel();
            for (_, sim) in &pods {
                sim.cancel();
            }
            Ok(())
        })?;
    }
}

/// Two pods on 127.0.0.2 and 127.0.0.3 with the same ports.
async fn two_pods(encoding: EventEncoding) -> [(Bound, CancellationToken); 2] {
    for _ in 0..10 {
        let a = start_sim_on([127, 0, 0, 2], None, encoding).await.unwrap();
        if let Ok(b) = start_sim_on([127, 0, 0, 3], Some(a.0), encoding).await {
            return [a, b];
        }
        a.1.cancel();
    }
    panic!("no common free ports for two pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_messages_are_replayed() {
    let (bound, sim) = start_sim(None, EventEncoding::Map).await;
    let f = follow(&bound, true);
    let mut prompts = vec![prompt(&[1, 2]), prompt(&[1, 3])];
    for p in &prompts {
        complete(&bound, p).await;
    }
    assert!(settles(&f, &bound, &prompts).await);
    // Batches published while the fault lasts never reach the socket (but are buffered).
    fault(&bound, "drop-events").await;
    for pieces in [[2, 2], [1, 2], [3, 1]] {
        prompts.push(prompt(&pieces));
        complete(&bound, prompts.last().unwrap()).await;
    }
    fault(&bound, "none").await;
    prompts.push(prompt(&[0, 1, 2]));
    complete(&bound, prompts.last().unwrap()).await;
    assert!(settles(&f, &bound, &prompts).await, "{}", f.metrics());
    assert_eq!(f.resyncs("gap"), 0, "filled, not cleared: {}", f.metrics());
    f.stop.cancel();
    sim.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replay_a_gap_clears_and_nothing_stale_remains() {
    let (bound, sim) = start_sim(None, EventEncoding::Array).await;
    let f = follow(&bound, false);
    // Without replay, batches published before the subscription reaches the publisher are
    // lost for good (ZMQ's slow joiner): send fresh prompts until one is seen.
    for i in 0u8.. {
        let probe = prompt(&[10 + i]);
        complete(&bound, &probe).await;
        if eventually(Duration::from_millis(500), async || f.held(&probe) > 0).await {
            break;
        }
    }
    // Without a replay, a stream is trusted from its first live message on.
    assert!(f.confirmed());
    let gaps_before = f.resyncs("gap");
    let first = prompt(&[1, 2, 3]);
    complete(&bound, &first).await;
    assert!(eventually(SETTLE, async || f.held(&first) == 4).await);
    fault(&bound, "drop-events").await;
    // Empties the pod's cache: kvroute misses it.
    post(&bound, "/reset_prefix_cache", "").await;
    fault(&bound, "none").await;
    let second = prompt(&[2, 2]);
    complete(&bound, &second).await;
    let gone = eventually(SETTLE, async || f.held(&first) == 0 && f.held(&second) > 0).await;
    assert!(
        gone,
        "first {} second {} {}",
        f.held(&first),
        f.held(&second),
        f.metrics()
    );
    assert_eq!(f.resyncs("gap"), gaps_before + 1);
    assert!(settles(&f, &bound, &[first, second]).await);
    f.stop.cancel();
    sim.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restart_drops_the_old_entries() {
    let (bound, sim) = start_sim(None, EventEncoding::Map).await;
    let f = follow(&bound, true);
    let old = prompt(&[1, 2, 3]);
    complete(&bound, &old).await;
    assert!(settles(&f, &bound, std::slice::from_ref(&old)).await);
    fault(&bound, "restart").await;
    fault(&bound, "none").await;
    let new = prompt(&[3, 2]);
    complete(&bound, &new).await;
    assert!(
        settles(&f, &bound, &[old.clone(), new.clone()]).await,
        "{}",
        f.metrics()
    );
    assert_eq!(f.held(&old), 0);
    f.stop.cancel();
    sim.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_dies_and_comes_back_then_leaves() {
    let (bound, sim) = start_sim(None, EventEncoding::Map).await;
    let f = follow(&bound, true);
    let before = prompt(&[1, 1, 2]);
    complete(&bound, &before).await;
    assert!(settles(&f, &bound, std::slice::from_ref(&before)).await);
    // The pod dies mid-stream; a new process comes up at the same address.
    sim.cancel();
    assert!(
        eventually(SETTLE, async || !f.confirmed()).await,
        "a dead publisher is noticed"
    );
    let (again, sim) = start_sim(Some(bound), EventEncoding::Map).await;
    let after = prompt(&[2, 1]);
    complete(&again, &after).await;
    assert!(
        settles(&f, &again, &[before.clone(), after.clone()]).await,
        "{}",
        f.metrics()
    );
    assert_eq!(f.held(&before), 0, "the dead process's blocks are gone");
    // The pod leaves the pool: its entries go with it.
    f.registry.replace(Vec::new());
    assert!(eventually(SETTLE, async || f.index.read().entries() == 0).await);
    f.stop.cancel();
    sim.cancel();
}

/// An event published just after kvroute subscribed, but before its subscription reached
/// the publisher, comes neither in the first replay nor live, and an idle pod sends nothing
/// after it that would show the gap: the replay kvroute asks for once its subscription has
/// surely arrived brings it. (Here the pod drops every live message, so only that second
/// replay can.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_while_joining_comes_with_the_join_replay() {
    let (bound, sim) = start_sim(None, EventEncoding::Map).await;
    let f = follow(&bound, true);
    assert!(eventually(SETTLE, async || f.confirmed()).await);
    fault(&bound, "drop-events").await;
    let first = prompt(&[4, 2]);
    complete(&bound, &first).await;
    assert!(
        settles(&f, &bound, std::slice::from_ref(&first)).await,
        "{}",
        f.metrics()
    );
    f.stop.cancel();
    sim.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_silent_while_serving_is_unconfirmed_and_caught_up() {
    let (bound, sim) = start_sim(None, EventEncoding::Map).await;
    let f = follow_with(&bound, true, Duration::from_millis(300));
    let first = prompt(&[1, 2]);
    complete(&bound, &first).await;
    assert!(settles(&f, &bound, std::slice::from_ref(&first)).await);
    // Requests are in flight on the pod but its events stop coming.
    let endpoint = f.registry.snapshot()[0].clone();
    let _serving = endpoint.acquire();
    fault(&bound, "drop-events").await;
    let second = prompt(&[3, 1]);
    complete(&bound, &second).await;
    let noticed = eventually(SETTLE, async || {
        f.counter("kvroute_kv_event_silences_total") >= 1
    })
    .await;
    assert!(noticed, "{}", f.metrics());
    // Each reconnection catches up from the replay buffer, so the index is right even
    // though no live message arrives.
    assert!(
        settles(&f, &bound, &[first, second]).await,
        "{}",
        f.metrics()
    );
    f.stop.cancel();
    sim.cancel();
}
