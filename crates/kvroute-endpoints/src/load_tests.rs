#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

/// vLLM 0.10's `/metrics` (Python prometheus_client text), trimmed to one of each kind.
pub(crate) const VLLM: &str = include_str!("../testdata/vllm.txt");
/// SGLang's `/metrics`.
const SGLANG: &str = include_str!("../testdata/sglang.txt");

#[test]
fn reads_vllm() {
    let load = parse_load(VLLM).unwrap();
    assert_eq!(
        load,
        PodLoad {
            waiting: 3,
            running: 12,
            kv_usage: 0.4375,
            running_loras: vec!["sql-lora".into(), "chat-lora".into()],
            waiting_loras: vec!["summarize-lora".into()],
            max_lora: Some(4),
            block_size: Some(16),
            kv_blocks: Some(28_320),
            prompts: None,
        },
        "LoRA lists from the newest of three series"
    );
    assert_eq!(load.kv_capacity_tokens(), Some(28_320 * 16));
}

/// `vllm:request_prompt_tokens` as vLLM writes it (one series per engine, `_sum`, `_count`
/// and buckets): the totals summed over engines; half a histogram, or a negative or
/// non-finite total, is none.
#[test]
fn reads_the_pods_count_of_prompts() {
    let m = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
    let histogram = |engine: u32, sum: &str, count: &str| {
        format!(
            "vllm:request_prompt_tokens_sum{{engine=\"{engine}\",{m}}} {sum}\n\
             vllm:request_prompt_tokens_bucket{{engine=\"{engine}\",le=\"1000.0\",{m}}} 5.0\n\
             vllm:request_prompt_tokens_bucket{{engine=\"{engine}\",le=\"+Inf\",{m}}} {count}\n\
             vllm:request_prompt_tokens_count{{engine=\"{engine}\",{m}}} {count}\n"
        )
    };
    let head = "# HELP vllm:request_prompt_tokens Number of prefill tokens processed.\n\
                # TYPE vllm:request_prompt_tokens histogram\n";
    let text = format!(
        "{VLLM}{head}{}{}",
        histogram(0, "1.2288e+06", "1200.0"),
        histogram(1, "2048.0", "2.0")
    );
    assert_eq!(
        parse_load(&text).unwrap().prompts,
        Some(PromptTotals {
            tokens: 1_230_848.0,
            requests: 1_202.0,
        })
    );
    assert_eq!(parse_load(VLLM).unwrap().prompts, None);
    let count_only = format!("{VLLM}vllm:request_prompt_tokens_count{{{m}}} 3\n");
    assert_eq!(parse_load(&count_only).unwrap().prompts, None);
    for sum in ["-1.0", "NaN", "+Inf"] {
        let odd = format!("{VLLM}{}", histogram(0, sum, "3.0"));
        assert_eq!(parse_load(&odd).unwrap().prompts, None, "{sum}");
    }
}

/// SGLang counts its prompts in two counters, both increased as a request finishes; with
/// only one of them (older releases) there are no totals.
#[test]
fn reads_sglangs_count_of_prompts() {
    assert_eq!(parse_load(SGLANG).unwrap().prompts, None);
    let text = format!(
        "{SGLANG}# TYPE sglang:num_requests_total counter\n\
         sglang:num_requests_total{{model_name=\"m\"}} 4000.0\n"
    );
    assert_eq!(
        parse_load(&text).unwrap().prompts,
        Some(PromptTotals {
            tokens: 8_128_902.0,
            requests: 4_000.0,
        })
    );
    // vLLM's histogram is read first, and a broken one is not made up from SGLang's.
    let both =
        format!("{text}vllm:request_prompt_tokens_count 2\nvllm:request_prompt_tokens_sum 10\n");
    assert_eq!(
        parse_load(&both).unwrap().prompts.map(|p| p.requests),
        Some(2.0)
    );
    let broken = format!("{text}vllm:request_prompt_tokens_count 2\n");
    assert_eq!(parse_load(&broken).unwrap().prompts, None);
}

#[test]
fn an_engine_that_has_not_profiled_its_memory_reports_no_capacity() {
    let text = VLLM.replace("num_gpu_blocks=\"28320\"", "num_gpu_blocks=\"None\"");
    let load = parse_load(&text).unwrap();
    assert_eq!((load.kv_blocks, load.kv_capacity_tokens()), (None, None));
}

#[test]
fn reads_sglang() {
    let load = parse_load(SGLANG).unwrap();
    assert_eq!(
        load,
        PodLoad {
            waiting: 5,
            running: 28,
            kv_usage: 0.28,
            block_size: Some(1),
            kv_blocks: Some(637_384),
            ..PodLoad::default()
        }
    );
    assert_eq!(
        parse_load(SGLANG).unwrap().kv_capacity_tokens(),
        Some(637_384),
        "num_pages pages of page_size tokens"
    );
}

#[test]
fn older_vllm_kv_name_and_data_parallel_engines() {
    let text = "vllm:num_requests_running{engine=\"0\"} 2\n\
                vllm:num_requests_running{engine=\"1\"} 5\n\
                vllm:num_requests_waiting{engine=\"0\"} 1\n\
                vllm:num_requests_waiting{engine=\"1\"} 0\n\
                vllm:gpu_cache_usage_perc{engine=\"0\"} 0.2\n\
                vllm:gpu_cache_usage_perc{engine=\"1\"} 0.6\n";
    let load = parse_load(text).unwrap();
    assert_eq!((load.running, load.waiting), (7, 1), "summed over engines");
    assert!(
        (load.kv_usage - 0.4).abs() < 1e-12,
        "averaged: {}",
        load.kv_usage
    );
    let both = format!("{text}vllm:kv_cache_usage_perc 0.9\n");
    assert_eq!(
        parse_load(&both).unwrap().kv_usage,
        0.9,
        "the current name wins"
    );
}

#[test]
fn the_simulator_is_read_like_vllm() {
    // The exact lines kvroute-sim writes (crates/kvroute-sim/src/server.rs, `metrics`).
    let text = "# HELP vllm:num_requests_running Requests in model execution batches.\n\
                # TYPE vllm:num_requests_running gauge\n\
                vllm:num_requests_running{model_name=\"m\"} 4\n\
                # HELP vllm:num_requests_waiting Requests waiting to be processed.\n\
                # TYPE vllm:num_requests_waiting gauge\n\
                vllm:num_requests_waiting{model_name=\"m\"} 9\n\
                # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
                # TYPE vllm:kv_cache_usage_perc gauge\n\
                vllm:kv_cache_usage_perc{model_name=\"m\"} 0.125\n\
                # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig.\n\
                # TYPE vllm:cache_config_info gauge\n\
                vllm:cache_config_info{model_name=\"m\",block_size=\"16\",num_gpu_blocks=\"4096\",enable_prefix_caching=\"True\"} 1\n\
                # HELP vllm:lora_requests_info Running stats on LoRA requests.\n\
                # TYPE vllm:lora_requests_info gauge\n\
                vllm:lora_requests_info{model_name=\"m\",max_lora=\"0\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1\n\
                # HELP vllm:request_prompt_tokens Number of prefill tokens processed.\n\
                # TYPE vllm:request_prompt_tokens histogram\n\
                vllm:request_prompt_tokens_bucket{le=\"1.0\",model_name=\"m\"} 0\n\
                vllm:request_prompt_tokens_bucket{le=\"+Inf\",model_name=\"m\"} 7\n\
                vllm:request_prompt_tokens_count{model_name=\"m\"} 7\n\
                vllm:request_prompt_tokens_sum{model_name=\"m\"} 35840\n";
    let load = parse_load(text).unwrap();
    assert_eq!(
        load,
        PodLoad {
            waiting: 9,
            running: 4,
            kv_usage: 0.125,
            running_loras: vec![],
            waiting_loras: vec![],
            max_lora: Some(0),
            block_size: Some(16),
            kv_blocks: Some(4096),
            prompts: Some(PromptTotals {
                tokens: 35_840.0,
                requests: 7.0,
            }),
        }
    );
}

#[test]
fn rejects_what_is_not_a_model_server() {
    assert!(matches!(
        parse_load("<html>Bad gateway</html>"),
        Err(LoadError::Syntax(_))
    ));
    assert!(matches!(
        parse_load("node_load1 0.5\n"),
        Err(LoadError::Missing(_))
    ));
    let no_kv = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n";
    let err = parse_load(no_kv).unwrap_err().to_string();
    assert!(err.contains("KV-cache"), "{err}");
    let one_bad_line = format!("{VLLM}vllm:num_requests_running{{engine=\"0\" 3\n");
    assert!(matches!(
        parse_load(&one_bad_line),
        Err(LoadError::Syntax(SyntaxError { line: 70, .. }))
    ));
    assert!(parse_load("").is_err());
}

#[test]
fn odd_values_stay_in_range() {
    let text = |run: &str, wait: &str, kv: &str| {
        format!(
            "vllm:num_requests_running {run}\nvllm:num_requests_waiting {wait}\nvllm:kv_cache_usage_perc {kv}\n"
        )
    };
    let load = parse_load(&text("-3", "1e20", "1.5")).unwrap();
    assert_eq!(
        (load.running, load.waiting, load.kv_usage),
        (0, u32::MAX, 1.0)
    );
    let load = parse_load(&text("2.6", "0", "-0.5")).unwrap();
    assert_eq!((load.running, load.kv_usage), (3, 0.0));
    let nan = parse_load(&text("1", "1", "NaN"));
    assert_eq!(
        nan,
        Err(LoadError::Missing(
            "KV-cache usage (vllm:kv_cache_usage_perc)"
        ))
    );
    let load = parse_load(&format!(
        "{}vllm:kv_cache_usage_perc +Inf\n",
        text("1", "1", "0.5")
    ))
    .unwrap();
    assert_eq!(load.kv_usage, 0.5, "non-finite series are ignored");
    let huge = "vllm:num_requests_running 1\nvllm:num_requests_waiting 1\n\
                vllm:kv_cache_usage_perc 1e308\nvllm:kv_cache_usage_perc 1e308\n";
    assert_eq!(
        parse_load(huge).unwrap().kv_usage,
        1.0,
        "overflowing sum clamps"
    );
}

/// One generated series: name, labels (in a random order), value.
#[derive(Clone, Debug)]
struct Series {
    name: &'static str,
    labels: Vec<(String, String)>,
    value: f64,
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 0.0..100.0f64,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => -5.0..0.0f64,
        1 => proptest::num::f64::NORMAL,
    ]
}

fn series() -> impl Strategy<Value = Series> {
    let names = prop::sample::select(vec![
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "vllm:prompt_tokens_total",
        "vllm:request_prompt_tokens_sum",
        "vllm:request_prompt_tokens_count",
        "sglang:prompt_tokens_total",
        "sglang:num_requests_total",
        "vllm:time_to_first_token_seconds_bucket",
        "process_resident_memory_bytes",
    ]);
    let extra = prop::collection::vec(("[a-z_]{1,8}", "[ -~]{0,10}"), 0..3);
    let loras = prop::collection::vec("[a-z]{1,6}", 0..3).prop_map(|v| v.join(","));
    (
        names,
        extra,
        loras,
        loras_waiting(),
        0u32..8,
        1u32..64,
        value(),
        any::<u64>(),
    )
        .prop_map(
            |(name, extra, running, waiting, max_lora, block, value, seed)| {
                let mut labels: Vec<(String, String)> = extra
                    .into_iter()
                    .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
                    .collect();
                labels.push(("model_name".into(), "m".into()));
                if name == "vllm:lora_requests_info" {
                    labels.push(("running_lora_adapters".into(), running));
                    labels.push(("waiting_lora_adapters".into(), waiting));
                    labels.push(("max_lora".into(), max_lora.to_string()));
                }
                if name == "vllm:cache_config_info" {
                    labels.push(("block_size".into(), block.to_string()));
                }
                labels.sort();
                labels.dedup_by(|a, b| a.0 == b.0);
                // A random label order.
                let n = labels.len();
                labels.rotate_left(seed as usize % n.max(1));
                if seed & 1 == 1 {
                    labels.reverse();
                }
                Series {
                    name,
                    labels,
                    value,
                }
            },
        )
}

const KNOWN: [&str; 5] = [
    "model_name",
    "running_lora_adapters",
    "waiting_lora_adapters",
    "max_lora",
    "block_size",
];

fn loras_waiting() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z]{1,6}", 0..3).prop_map(|v| v.join(","))
}

fn render(series: &[Series]) -> String {
    let mut out = String::new();
    for s in series {
        let labels: Vec<String> = s
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', r"\\").replace('"', "\\\"")))
            .collect();
        out.push_str(&format!("# TYPE {} gauge\n", s.name));
        out.push_str(&format!(
            "{}{{{}}} {:?}\n",
            s.name,
            labels.join(","),
            s.value
        ));
    }
    out
}

/// The mapping written the slow, obvious way.
fn model(series: &[Series]) -> Option<PodLoad> {
    let finite = |name: &str| -> Vec<f64> {
        series
            .iter()
            .filter(|s| s.name == name && s.value.is_finite())
            .map(|s| s.value)
            .collect()
    };
    let first = |names: &[&str]| names.iter().map(|n| finite(n)).find(|v| !v.is_empty());
    let count = |v: Vec<f64>| v.iter().sum::<f64>().round() as u32;
    let waiting = count(first(&[
        "vllm:num_requests_waiting",
        "sglang:num_queue_reqs",
    ])?);
    let running = count(first(&[
        "vllm:num_requests_running",
        "sglang:num_running_reqs",
    ])?);
    let kv = first(&[
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "sglang:token_usage",
    ])?;
    let mean = kv.iter().sum::<f64>() / kv.len() as f64;
    let kv_usage = if mean.is_finite() {
        mean.clamp(0.0, 1.0)
    } else if mean > 0.0 {
        1.0
    } else {
        0.0
    };
    let label = |s: &Series, k: &str| {
        s.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let mut load = PodLoad {
        waiting,
        running,
        kv_usage,
        block_size: series
            .iter()
            .find(|s| s.name == "vllm:cache_config_info")
            .and_then(|s| label(s, "block_size")?.parse().ok()),
        ..PodLoad::default()
    };
    let total = |name: &str| {
        let v = finite(name);
        let t: f64 = v.iter().sum();
        (!v.is_empty() && t.is_finite() && t >= 0.0).then_some(t)
    };
    let pair = |tokens: &str, requests: &str| {
        total(tokens)
            .zip(total(requests))
            .map(|(tokens, requests)| PromptTotals { tokens, requests })
    };
    let vllm = [
        "vllm:request_prompt_tokens_sum",
        "vllm:request_prompt_tokens_count",
    ];
    load.prompts = if vllm.iter().any(|n| !finite(n).is_empty()) {
        pair(vllm[0], vllm[1])
    } else {
        pair("sglang:prompt_tokens_total", "sglang:num_requests_total")
    };
    let mut newest: Option<&Series> = None;
    for s in series
        .iter()
        .filter(|s| s.name == "vllm:lora_requests_info")
    {
        if s.value.is_finite() && newest.is_none_or(|n| s.value > n.value) {
            newest = Some(s);
        }
    }
    if let Some(s) = newest {
        let list = |k| {
            label(s, k)
                .unwrap_or_default()
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect()
        };
        load.running_loras = list("running_lora_adapters");
        load.waiting_loras = list("waiting_lora_adapters");
        load.max_lora = label(s, "max_lora").and_then(|v| v.parse().ok());
    }
    Some(load)
}

proptest! {
    #[test]
    fn mapping_matches_the_model(series in prop::collection::vec(series(), 0..24)) {
        let text = render(&series);
        let got = parse_load(&text);
        match model(&series) {
            Some(want) => {
                let got = got.unwrap();
                prop_assert!((0.0..=1.0).contains(&got.kv_usage), "kv {}", got.kv_usage);
                prop_assert!((got.kv_usage - want.kv_usage).abs() < 1e-9);
                let kv_usage = got.kv_usage;
                prop_assert_eq!(got, PodLoad { kv_usage, ..want });
            }
            None => prop_assert!(matches!(got, Err(LoadError::Missing(_))), "{:?}", got),
        }
    }
}
