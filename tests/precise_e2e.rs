//! Precise routing end to end: two simulated vLLM pods publishing KV events over ZMQ, the
//! real `kvroute serve` subscribed to both, real Envoy in front. A prefix cached on a pod
//! by traffic that never went through kvroute (so the approximate index cannot know) is
//! found from the pod's events, and the next request with that prefix goes there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use harness::*;
use kvroute_sim::server::Bound;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_cached_behind_kvroutes_back_is_found_from_kv_events() {
    let dir = scratch("precise");
    let stop = CancellationToken::new();
    let pods = two_pods(&stop, None, None).await;
    let list = format!("{},{}", pods[0].http, pods[1].http);
    let events = pods[0].events.port().to_string();
    let replay = pods[0].replay.port().to_string();
    let kvroute = Kvroute::start(
        &dir,
        &list,
        &[
            "--kv-events-port",
            &events,
            "--kv-replay-port",
            &replay,
            "--kv-events-topic",
            "kv@",
            "--block-size",
            "16",
        ],
    )
    .await;
    let addrs = [pods[0].http, pods[1].http];
    let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;

    for (round, home) in [1usize, 0, 1].into_iter().enumerate() {
        // 256 tokens (16 blocks) cached on `home` by a request sent to it directly.
        let base = 10_000 * (round as u32 + 1);
        let stored_before = stored_blocks(&kvroute).await;
        let document: Vec<u32> = (base..base + 256).collect();
        let direct = test_support::http::request(
            pods[home].http,
            "POST",
            "/v1/completions",
            &[],
            completion(&document),
        )
        .await;
        assert_eq!(direct.status, 200);
        let seen = eventually(Duration::from_secs(10), async || {
            stored_blocks(&kvroute).await >= stored_before + 16.0
        })
        .await;
        assert!(seen, "{}\n{}", kvroute.metrics().await, kvroute.log_text());
        let metrics = kvroute.metrics().await;
        assert!(metrics.contains("kvroute_kv_index_blocks "), "{metrics}");
        assert!(
            metrics.contains(&format!(
                "kvroute_endpoint_kv_events_confirmed{{endpoint=\"{}\"}} 1",
                pods[home].http
            )),
            "{metrics}"
        );

        // The same document with a question, through Envoy: it goes to `home`, whose cache
        // then serves the document.
        let hits_before = pod_counter(&pods[home], "vllm:prefix_cache_hits_total").await;
        let mut asked = document.clone();
        asked.extend(base + 900..base + 920);
        let reply = http(
            envoy.port,
            "POST",
            "/v1/completions",
            &[],
            completion(&asked),
        )
        .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let hits = pod_counter(&pods[home], "vllm:prefix_cache_hits_total").await;
        assert_eq!(
            hits - hits_before,
            256.0,
            "round {round}: the document was served from pod {home}'s cache\n{}",
            kvroute.log_text()
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_without_an_event_stream_are_routed_approximately() {
    let dir = scratch("precise-none");
    // Model servers that publish no events: nothing listens on the event port.
    let backends = Backends::start(2, Duration::ZERO).await;
    let closed = free_port().to_string();
    let kvroute = Kvroute::start(&dir, &backends.list(), &["--kv-events-port", &closed]).await;
    let envoy = Envoy::start(
        &dir,
        &EnvoyOptions::full_duplex(kvroute.grpc_port, &backends.addrs),
    )
    .await;
    let system = "You are the assistant of one tenant. Policies follow. ".repeat(30);
    let mut served = std::collections::HashSet::new();
    for round in 0..4 {
        let question = format!("question {round}");
        served.insert(chat_served_by(envoy.port, &system, &question).await);
    }
    assert_eq!(
        served.len(),
        1,
        "the approximate index keeps the prompt home: {served:?}"
    );
    let metrics = kvroute.metrics().await;
    assert!(!metrics.contains("kv_event_batches_total{"), "{metrics}");
}

/// Two pods tokenizing with Qwen3's real tokenizer (and, with `template`, rendering chats
/// with its template), kvroute following their events with the same files, Envoy in front.
struct Tokenized {
    stop: CancellationToken,
    pods: [Bound; 2],
    kvroute: Kvroute,
    envoy: Envoy,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Last, so it goes once the processes reading and writing there have.
    _dir: Scratch,
}

impl Tokenized {
    async fn start(name: &str, template: bool) -> Self {
        let tokenizer_json =
            PathBuf::from(std::env::var("KVROUTE_TEST_TOKENIZER").expect(
                "KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json",
            ));
        let dir = scratch(name);
        // kvroute's tokenizer directory: the model "m" is Qwen3.
        let model_dir = dir.join("tokenizers/m");
        std::fs::create_dir_all(&model_dir).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tokenizer_json.with_file_name(file), model_dir.join(file)).unwrap();
        }
        let chat_template = template.then(|| {
            let config: serde_json::Value = serde_json::from_slice(
                &std::fs::read(tokenizer_json.with_file_name("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            Arc::new(
                kvroute_chat::ChatTemplate::from_config(&config)
                    .unwrap()
                    .unwrap(),
            )
        });
        let tokenizer = Arc::new(tokenizers::Tokenizer::from_file(&tokenizer_json).unwrap());
        let stop = CancellationToken::new();
        let pods = two_pods(&stop, Some(Arc::clone(&tokenizer)), chat_template).await;
        let list = format!("{},{}", pods[0].http, pods[1].http);
        let events = pods[0].events.port().to_string();
        let tokenizers_dir = dir.join("tokenizers").display().to_string();
        let kvroute = Kvroute::start(
            &dir,
            &list,
            &[
                "--kv-events-port",
                &events,
                "--tokenizers-dir",
                &tokenizers_dir,
            ],
        )
        .await;
        let addrs = [pods[0].http, pods[1].http];
        let envoy = Envoy::start(&dir, &EnvoyOptions::full_duplex(kvroute.grpc_port, &addrs)).await;
        Self {
            stop,
            pods,
            kvroute,
            envoy,
            tokenizer,
            _dir: dir,
        }
    }

    /// `warm` sent to pod `home` directly (kvroute does not see it), then, once its
    /// `blocks` blocks are reported, `asked` through Envoy; returns the prompt tokens pod
    /// `home` served `asked` from its cache.
    async fn round(
        &self,
        home: usize,
        path: &str,
        warm: Vec<u8>,
        asked: Vec<u8>,
        blocks: usize,
    ) -> f64 {
        let stored_before = stored_blocks(&self.kvroute).await;
        let direct =
            test_support::http::request(self.pods[home].http, "POST", path, &[], warm).await;
        assert_eq!(direct.status, 200, "{}", direct.text());
        let seen = eventually(Duration::from_secs(10), async || {
            stored_blocks(&self.kvroute).await >= stored_before + blocks as f64
        })
        .await;
        assert!(seen, "{}", self.kvroute.metrics().await);
        let hits_before = pod_counter(&self.pods[home], "vllm:prefix_cache_hits_total").await;
        let reply = http(self.envoy.port, "POST", path, &[], asked).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        pod_counter(&self.pods[home], "vllm:prefix_cache_hits_total").await - hits_before
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_prompts_route_precisely_with_the_models_tokenizer() {
    let t = Tokenized::start("precise-text", false).await;
    let body = |prompt: &str| {
        serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 4})
            .to_string()
            .into_bytes()
    };
    for (round, home) in [1usize, 0].into_iter().enumerate() {
        let document = format!("Document {round}. ")
            + &"Precise routing reads what each pod really caches. ".repeat(40);
        let tokens = t.tokenizer.encode(document.as_str(), false).unwrap().len();
        let asked = format!("{document}\nQuestion: what does it read?");
        let hits = t
            .round(
                home,
                "/v1/completions",
                body(&document),
                body(&asked),
                tokens / 16,
            )
            .await;
        // All of the document's full blocks but (at most) the last, whose tokens may merge
        // with the question's first.
        assert!(
            hits >= (16 * (tokens / 16 - 1)) as f64,
            "round {round}: {hits} of {tokens} document tokens from pod {home}'s cache\n{}",
            t.kvroute.log_text()
        );
    }
    t.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompts_route_precisely_with_the_models_template() {
    let t = Tokenized::start("precise-chat", true).await;
    for (round, home) in [1usize, 0].into_iter().enumerate() {
        let system = format!("Policy book {round}. ")
            + &"Answer from the policy book only, and quote it. ".repeat(40);
        let chat = |question: &str| {
            serde_json::json!({"model": "m", "max_tokens": 4, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question}
            ]})
            .to_string()
            .into_bytes()
        };
        let tokens = t.tokenizer.encode(system.as_str(), false).unwrap().len();
        let hits = t
            .round(
                home,
                "/v1/chat/completions",
                chat("What is covered?"),
                chat("Who is excluded?"),
                tokens / 16,
            )
            .await;
        assert!(
            hits >= (16 * (tokens / 16)) as f64,
            "round {round}: {hits} cached tokens on pod {home} for a {tokens}-token system prompt\n{}",
            t.kvroute.log_text()
        );
    }
    t.stop.cancel();
}
