//! The simulator as a server, over real sockets: OpenAI API (JSON and SSE), `/metrics`
//! parsed by a Prometheus text parser, KV events on ZMQ decoded as generic msgpack and
//! checked field by field against vLLM's definitions, replay, faults, and the real-time
//! engine's cache equal to the virtual-time engine's for the same requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
use kvroute_sim::server::{self, Bound, PdConfig, Role, ServerConfig};
use kvroute_sim::wire::EventEncoding;
use kvroute_sim::{Engine, Profile, PromptTokens, SimRequest};
use openmetrics_parser::PrometheusValue;
use rmpv::Value;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn profile() -> Profile {
    Profile::h100_llama31_8b()
}

async fn start() -> (Bound, CancellationToken) {
    start_with(profile(), &[]).await.unwrap()
}

/// A pod with a part in disaggregated serving.
async fn start_pd(pd: PdConfig) -> (Bound, CancellationToken) {
    start_full(profile(), &[], pd, false).await.unwrap()
}

/// A pod of `profile` serving LoRA `adapters`.
async fn start_with(
    profile: Profile,
    adapters: &[&str],
) -> Result<(Bound, CancellationToken), server::StartError> {
    start_full(profile, adapters, PdConfig::default(), false).await
}

async fn start_full(
    profile: Profile,
    adapters: &[&str],
    pd: PdConfig,
    force_include_usage: bool,
) -> Result<(Bound, CancellationToken), server::StartError> {
    let stop = CancellationToken::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let bound = server::start(
        ServerConfig {
            http: any,
            events: any,
            replay: any,
            topic: "kv@sim@m".into(),
            model: "m".into(),
            profile,
            speed: 1000.0,
            encoding: EventEncoding::Map,
            tokenizer: None,
            chat_template: None,
            lora_adapters: adapters.iter().map(|a| (*a).to_owned()).collect(),
            force_include_usage,
            pd,
        },
        stop.clone(),
    )
    .await?;
    Ok((bound, stop))
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let reply =
        test_support::http::request(addr, method, path, &[], body.as_bytes().to_vec()).await;
    (reply.status, reply.text())
}

/// A completion request; a streamed one asks for its usage.
fn completion(prompt: &str, stream: bool) -> String {
    let mut body =
        serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 3, "stream": stream});
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body.to_string()
}

/// A 1,000-byte shared document: 250 tokens, 15 full blocks, under the byte-chunk tokenizer.
fn document() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(23)[..1000].to_owned()
}

/// A non-streaming completion of `prompt`; returns the HTTP status.
async fn complete(bound: &Bound, prompt: &str) -> u16 {
    http(
        bound.http,
        "POST",
        "/v1/completions",
        &completion(prompt, false),
    )
    .await
    .0
}

/// Sets a fault through the test hook; returns the HTTP status.
async fn set_fault(bound: &Bound, fault: &str) -> u16 {
    let body = serde_json::json!({ "fault": fault }).to_string();
    http(bound.http, "POST", "/sim/fault", &body).await.0
}

/// Asks the replay socket for every batch from `start` and returns their sequence numbers,
/// checking the frames and the end marker on the way.
async fn replay(bound: &Bound, start: u64) -> Vec<i64> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer
        .connect(&format!("tcp://{}", bound.replay))
        .await
        .unwrap();
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    dealer.send(req).await.unwrap();
    let mut seqs = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), dealer.recv())
            .await
            .unwrap()
            .unwrap();
        let frames = msg.into_vec();
        // [empty delimiter, topic, seq, payload]
        assert_eq!(frames.len(), 4, "{frames:?}");
        let seq = i64::from_be_bytes(frames[2][..].try_into().unwrap());
        if seq == -1 {
            assert!(frames[3].is_empty(), "the end marker has an empty payload");
            return seqs;
        }
        seqs.push(seq);
    }
}

fn field<'a>(map: &'a Value, key: &str) -> &'a Value {
    map.as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key} in {map}"))
}

/// A SUB socket on the pod's events, given time to reach the publisher.
async fn subscribe(bound: &Bound) -> zeromq::SubSocket {
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&format!("tcp://{}", bound.events))
        .await
        .unwrap();
    sub.subscribe("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_openai_api_metrics_and_kv_events() {
    let (bound, stop) = start().await;
    let mut sub = subscribe(&bound).await;

    let doc = document();
    let prompts = [
        format!("{doc} first question?"),
        format!("{doc} second one, a longer question?"),
        "unrelated".repeat(40),
    ];
    let mut usages = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (status, body) = http(
            bound.http,
            "POST",
            "/v1/completions",
            &completion(p, i == 1),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        if i == 1 {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            let last = body.lines().rfind(|l| l.starts_with("data: {")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&last[6..]).unwrap();
            usages.push(v["usage"].clone());
            assert_eq!(
                body.matches("\"text\":\"t").count(),
                3,
                "three token chunks"
            );
        } else {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            usages.push(v["usage"].clone());
        }
    }
    assert_eq!(usages[0]["prompt_tokens"], 254);
    assert_eq!(usages[0]["completion_tokens"], 3);
    assert_eq!(
        usages[1]["prompt_tokens_details"]["cached_tokens"], 240,
        "15 shared blocks"
    );

    // Events: three frames, sequence from 0, map-encoded BlockStored with vLLM's fields.
    let mut stored_blocks = 0;
    for expect_seq in 0u64..3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap()
            .unwrap();
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"kv@sim@m");
        assert_eq!(
            u64::from_be_bytes(frames[1][..].try_into().unwrap()),
            expect_seq
        );
        let batch = rmpv::decode::read_value(&mut &frames[2][..]).unwrap();
        let batch = batch.as_array().unwrap();
        assert_eq!(batch.len(), 3, "[ts, events, data_parallel_rank]");
        assert!(batch[0].as_f64().unwrap() > 1.7e9, "wall-clock ts");
        assert_eq!(batch[2].as_u64(), Some(0));
        for ev in batch[1].as_array().unwrap() {
            assert_eq!(field(ev, "type").as_str(), Some("BlockStored"));
            let hashes = field(ev, "block_hashes").as_array().unwrap();
            let tokens = field(ev, "token_ids").as_array().unwrap();
            assert_eq!(field(ev, "block_size").as_u64(), Some(16));
            assert_eq!(tokens.len(), hashes.len() * 16);
            assert_eq!(field(ev, "medium").as_str(), Some("GPU"));
            assert!(field(ev, "lora_id").is_nil() && field(ev, "lora_name").is_nil());
            let parent = field(ev, "parent_block_hash");
            assert_eq!(
                parent.is_nil(),
                expect_seq != 1,
                "the 2nd request extends the cached document"
            );
            stored_blocks += hashes.len();
        }
    }
    assert_eq!(
        stored_blocks,
        15 + 1 + 5,
        "document, the 2nd request's new block, the 3rd prompt"
    );

    // /metrics through a Prometheus text parser.
    let (_, text) = http(bound.http, "GET", "/metrics", "").await;
    let scrape = openmetrics_parser::prometheus::parse_prometheus(&text).unwrap();
    let sample = |family: &str| {
        scrape
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no {family} in {:?}", scrape.families.keys()))
            .iter_samples()
            .next()
            .unwrap()
            .clone()
    };
    let value = |family: &str| match sample(family).value {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        PrometheusValue::Gauge(g) | PrometheusValue::Unknown(g) => g.as_f64(),
        other => panic!("{other:?}"),
    };
    assert_eq!(value("vllm:prefix_cache_hits_total"), 240.0);
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:request_success_total"), 3.0);
    // Each finished request's prompt length, as vLLM's histogram has it.
    let PrometheusValue::Histogram(finished) = sample("vllm:request_prompt_tokens").value else {
        panic!("vllm:request_prompt_tokens is not a histogram");
    };
    let tokens: u64 = usages
        .iter()
        .map(|u| u["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(finished.count, Some(3));
    assert_eq!(finished.sum.map(|s| s.as_f64()), Some(tokens as f64));
    let info = sample("vllm:cache_config_info");
    let labels = info.get_labelset().unwrap();
    assert_eq!(labels.get_label_value("block_size"), Some("16"));
    assert_eq!(labels.get_label_value("num_gpu_blocks"), Some("26306"));
    assert_eq!(labels.get_label_value("model_name"), Some("m"));

    // Replay from sequence 1: batches 1 and 2, then the end marker.
    assert_eq!(replay(&bound, 1).await, [1, 2]);

    // The same requests through the virtual-time engine leave the same cache.
    let mut engine = Engine::new(profile(), false);
    for (i, p) in prompts.iter().enumerate() {
        let parsed = InferenceRequest::parse(
            ApiKind::Completions,
            completion(p, false).as_bytes(),
            RequestHints::default(),
        )
        .unwrap();
        assert!(
            engine.add(SimRequest {
                id: i as u64,
                prompt: PromptTokens::Explicit(Arc::from(
                    server::tokenize(&parsed.prompt, &parsed.chat, server::PromptModel::default())
                        .unwrap()
                )),
                max_tokens: 3,
                lora: None,
            })
        );
        while engine.has_work() {
            engine.step();
        }
    }
    let (_, cache) = http(bound.http, "GET", "/sim/cache", "").await;
    let cache: serde_json::Value = serde_json::from_str(&cache).unwrap();
    let live: Vec<u64> = cache["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect();
    assert_eq!(live, engine.cached_hashes());
    stop.cancel();
}

/// A streamed answer ends with its usage only when the request's
/// `stream_options.include_usage` asks, or the pod forces it (vLLM's
/// `--enable-force-include-usage`); a whole answer always has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_comes_in_a_stream_when_asked() {
    let ask = |options: serde_json::Value| {
        let mut body = serde_json::json!({"model": "m", "prompt": document(), "max_tokens": 2, "stream": true});
        if !options.is_null() {
            body["stream_options"] = options;
        }
        body.to_string()
    };
    let asks = [
        (serde_json::Value::Null, false),
        (serde_json::json!({"include_usage": false}), false),
        (serde_json::json!({"include_usage": true}), true),
    ];
    for force in [false, true] {
        let (bound, stop) = start_full(profile(), &[], PdConfig::default(), force)
            .await
            .unwrap();
        for (options, asked) in &asks {
            let (status, body) =
                http(bound.http, "POST", "/v1/completions", &ask(options.clone())).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            assert_eq!(
                body.contains("\"usage\":") && body.contains("\"prompt_tokens\":250"),
                *asked || force,
                "{options} force {force}: {body}"
            );
        }
        let (_, whole) = http(
            bound.http,
            "POST",
            "/v1/completions",
            &completion("hi", false),
        )
        .await;
        assert!(whole.contains("\"usage\""), "{whole}");
        stop.cancel();
    }
}

/// A request naming an adapter runs with it: its blocks are rooted at the adapter (the
/// base model's same prompt hits none of them), its events carry `lora_name`, and
/// `vllm:lora_requests_info` is served as vLLM serves it (a gauge valued at a timestamp,
/// `max_lora` the slots). A pod cannot serve adapters with no slot for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_lora_adapters_with_their_metrics_and_events() {
    assert!(start_with(profile(), &["sql"]).await.is_err());
    let (bound, stop) = start_with(profile().with_max_loras(2), &["sql", "chat"])
        .await
        .unwrap();
    let (_, text) = http(bound.http, "GET", "/metrics", "").await;
    assert!(
        text.contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 0\n"),
        "{text}"
    );
    let mut sub = subscribe(&bound).await;
    let doc = document();
    let ask = |model: &str| {
        serde_json::json!({"model": model, "prompt": format!("{doc} question?"), "max_tokens": 3})
            .to_string()
    };
    let cached = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (status, body) = http(bound.http, "POST", "/v1/completions", &ask("sql")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cached(&body), 0);
    let (_, body) = http(bound.http, "POST", "/v1/completions", &ask("m")).await;
    assert_eq!(
        cached(&body),
        0,
        "the base model shares no block with the adapter"
    );
    let (_, body) = http(bound.http, "POST", "/v1/completions", &ask("sql")).await;
    assert_eq!(cached(&body), 240, "the adapter's own blocks");

    let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    let frames = msg.into_vec();
    let batch = rmpv::decode::read_value(&mut &frames[2][..]).unwrap();
    let ev = &batch.as_array().unwrap()[1].as_array().unwrap()[0];
    assert_eq!(field(ev, "type").as_str(), Some("BlockStored"));
    assert_eq!(field(ev, "lora_name").as_str(), Some("sql"));
    assert_eq!(field(ev, "medium").as_str(), Some("GPU"));

    let (_, text) = http(bound.http, "GET", "/metrics", "").await;
    let scrape = openmetrics_parser::prometheus::parse_prometheus(&text).unwrap();
    let series: Vec<_> = scrape.families["vllm:lora_requests_info"]
        .iter_samples()
        .map(|s| {
            let labels = s.get_labelset().unwrap();
            let at = match &s.value {
                PrometheusValue::Gauge(g) | PrometheusValue::Unknown(g) => g.as_f64(),
                other => panic!("{other:?}"),
            };
            (
                labels.get_label_value("max_lora").unwrap().to_owned(),
                labels
                    .get_label_value("running_lora_adapters")
                    .unwrap()
                    .to_owned(),
                at,
            )
        })
        .collect();
    // Label sets seen: `sql` running, then nothing (vLLM keeps both series).
    assert!(series.iter().all(|(max, _, _)| max == "2"), "{series:?}");
    assert!(
        series.iter().any(|(_, running, _)| running == "sql"),
        "{series:?}"
    );
    let newest = series.iter().max_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!(newest.1, "", "all done: nothing runs now");
    assert!(newest.2 > 1.7e9, "valued at the time it was set");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_demand() {
    let (bound, stop) = start().await;
    assert_eq!(set_fault(&bound, "errors").await, 200);
    assert_eq!(complete(&bound, "hi").await, 500);
    assert_eq!(set_fault(&bound, "none").await, 200);
    assert_eq!(complete(&bound, &document()).await, 200);
    assert_eq!(set_fault(&bound, "bogus").await, 400);
    assert_eq!(
        http(bound.http, "POST", "/v1/completions", "{not json")
            .await
            .0,
        400
    );

    // A stalled engine answers nothing until it resumes.
    assert_eq!(set_fault(&bound, "stall").await, 200);
    let addr = bound.http;
    let pending = tokio::spawn(async move {
        http(addr, "POST", "/v1/completions", &completion("later", false)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "stalled");
    assert_eq!(set_fault(&bound, "none").await, 200);
    assert_eq!(pending.await.unwrap().0, 200);

    // Dropped event messages: none arrive, but replay still has them.
    let mut sub = subscribe(&bound).await;
    assert_eq!(set_fault(&bound, "drop-events").await, 200);
    let fresh = "never seen before, a prompt of its own. ".repeat(4);
    assert_eq!(complete(&bound, &fresh).await, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "the event message was dropped"
    );
    assert_eq!(set_fault(&bound, "none").await, 200);
    let replayed = replay(&bound, 0).await.len();
    assert!(replayed >= 2, "the dropped batch is in the replay buffer");

    // A restart empties the cache.
    let (_, cache) = http(bound.http, "GET", "/sim/cache", "").await;
    assert!(cache.len() > 20, "{cache}");
    assert_eq!(set_fault(&bound, "restart").await, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, cache) = http(bound.http, "GET", "/sim/cache", "").await;
    assert_eq!(cache, r#"{"hashes":[]}"#);
    // ... and numbers event batches from 0 again, as a restarted vLLM does.
    assert_eq!(
        http(bound.http, "POST", "/reset_prefix_cache", "").await.0,
        200
    );
    assert_eq!(complete(&bound, &fresh).await, 200);
    let frames = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap()
        .into_vec();
    assert_eq!(u64::from_be_bytes(frames[1][..].try_into().unwrap()), 0);
    stop.cancel();
}

/// With a real `tokenizer.json` (Qwen3's, fetched by `tests/run`), prompts are tokenized
/// exactly as Hugging Face's tokenizers do.
#[test]
fn a_real_tokenizer_gives_the_models_token_ids() {
    let path = std::env::var("KVROUTE_TEST_TOKENIZER")
        .expect("KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
    let model = server::PromptModel {
        tokenizer: Some(&tokenizer),
        template: None,
    };
    let ids = server::tokenize(
        &kvroute_core::Prompt::Text("Hello, my dog is cute. 日本語も".into()),
        &kvroute_core::ChatOptions::default(),
        model,
    )
    .unwrap();
    assert_eq!(
        ids,
        [
            9707, 11, 847, 5562, 374, 18838, 13, 75402, 21894, 102819, 31877
        ]
    );
}

/// With the model's chat template, a chat is rendered by it and tokenized without added
/// special tokens, as vLLM does.
#[test]
fn a_chat_is_rendered_with_the_models_template() {
    let path = std::path::PathBuf::from(
        std::env::var("KVROUTE_TEST_TOKENIZER")
            .expect("KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json"),
    );
    let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path.with_file_name("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let template = kvroute_chat::ChatTemplate::from_config(&config)
        .unwrap()
        .unwrap();
    let body = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#;
    let parsed = InferenceRequest::parse(
        ApiKind::ChatCompletions,
        body.as_bytes(),
        RequestHints::default(),
    )
    .unwrap();
    let model = server::PromptModel {
        tokenizer: Some(&tokenizer),
        template: Some(&template),
    };
    let ids = server::tokenize(&parsed.prompt, &parsed.chat, model).unwrap();
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        ids,
        tokenizer
            .encode(rendered, false)
            .unwrap()
            .get_ids()
            .to_vec()
    );
}

/// The cached block hashes a pod reports.
async fn cached(bound: &Bound) -> Vec<u64> {
    let (_, body) = http(bound.http, "GET", "/sim/cache", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect()
}

/// A decode pod honours `x-prefiller-host-port` as llm-d's sidecar does: the prefill pod
/// computes the prompt (and caches it), the decode pod then holds it too and says who
/// prefilled. A prefill pod ignores the header; an unreachable prefill pod costs the request
/// nothing (the decode pod prefills).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_pod_has_its_prompt_prefilled_where_the_header_says() {
    let (prefill, stop_p) = start_pd(PdConfig {
        role: Role::Prefill,
        ..PdConfig::default()
    })
    .await;
    let (decode, stop_d) = start_pd(PdConfig {
        role: Role::Decode,
        ..PdConfig::default()
    })
    .await;
    let send = async |to: &Bound, via: &str, prompt: &str| {
        test_support::http::request(
            to.http,
            "POST",
            "/v1/completions",
            &[("x-prefiller-host-port", via)],
            completion(prompt, true).into_bytes(),
        )
        .await
    };
    let doc = document();
    let reply = send(&decode, &prefill.http.to_string(), &doc).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-sim-prefilled-by"), prefill.http.to_string());
    assert!(
        reply.text().ends_with("data: [DONE]\n\n"),
        "{}",
        reply.text()
    );
    // The prompt's 15 full blocks (250 byte-chunk tokens) sit on both pods.
    let (on_prefill, on_decode) = (cached(&prefill).await, cached(&decode).await);
    assert!(on_prefill.len() >= 15, "{on_prefill:?}");
    assert!(on_prefill.iter().take(15).all(|h| on_decode.contains(h)));
    // The decode pod computed only the last block's tokens of the prompt.
    let metrics = http(decode.http, "GET", "/metrics", "").await.1;
    let prompt_tokens: f64 = metrics
        .lines()
        .find(|l| l.starts_with("vllm:prompt_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(prompt_tokens < 16.0, "{prompt_tokens}");

    // A prefill pod serves what it is sent.
    let reply = send(
        &prefill,
        &decode.http.to_string(),
        "a prefill pod never forwards",
    )
    .await;
    assert_eq!(
        (reply.status, reply.header("x-sim-prefilled-by")),
        (200, "")
    );
    // Nothing listens there: the decode pod computes the prompt itself.
    let reply = send(&decode, "127.0.0.1:9", "nobody prefills this").await;
    assert_eq!(
        (reply.status, reply.header("x-sim-prefilled-by")),
        (200, "")
    );
    stop_p.cancel();
    stop_d.cancel();
}

/// Reads one HTTP/1.1 response with a `content-length` off `stream`: its status line and
/// headers (lowercased), and its body.
async fn read_response(stream: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(
            n,
            1,
            "the connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

/// A client that pools connections (vllm-router's does) sends what the pod does not serve
/// (its `/v1/chat/completions/render`) and then its next request on the same connection:
/// the pod reads the unserved request's body, so the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outlives_a_request_the_pod_does_not_serve() {
    use tokio::io::AsyncWriteExt;
    let (bound, stop) = start().await;
    let mut stream = tokio::net::TcpStream::connect(bound.http).await.unwrap();
    // A long chat's worth: hyper drains a short unread body by itself, not a long one.
    let body = completion(&document().repeat(40), false);
    let unserved = format!(
        "POST /v1/chat/completions/render HTTP/1.1\r\nhost: pod\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(unserved.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: pod\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    stop.cancel();
}

/// A body over the pod's limit sent where the pod serves nothing is not read to its end: the
/// answer says the connection closes, so no client sends another request on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_unserved_request_closes_its_connection() {
    use tokio::io::AsyncWriteExt;
    let (bound, stop) = start().await;
    let mut stream = tokio::net::TcpStream::connect(bound.http).await.unwrap();
    let length = (64 << 20) + 1;
    let head = format!(
        "POST /v1/chat/completions/render HTTP/1.1\r\nhost: pod\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0;
    while sent < length {
        let n = chunk.len().min(length - sent);
        stream.write_all(&chunk[..n]).await.unwrap();
        sent += n;
    }
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    stop.cancel();
}
