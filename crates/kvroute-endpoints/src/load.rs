//! What a pod's `/metrics` says about its load, mapped from vLLM's names or SGLang's.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exposition::{self, Sample, SyntaxError};

/// What one scrape of a pod's /metrics said.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodLoad {
    /// Requests queued, not yet scheduled: `vllm:num_requests_waiting` (SGLang:
    /// `sglang:num_queue_reqs`), summed over the pod's series (one per data-parallel engine).
    pub waiting: u32,
    /// Requests in the running batch: `vllm:num_requests_running` (SGLang:
    /// `sglang:num_running_reqs`), summed likewise.
    pub running: u32,
    /// KV-cache use in 0..=1: `vllm:kv_cache_usage_perc`, else the older
    /// `vllm:gpu_cache_usage_perc` (SGLang: `sglang:token_usage`), averaged over series.
    pub kv_usage: f64,
    /// Adapters in the running batch: `vllm:lora_requests_info`'s `running_lora_adapters`
    /// (comma-separated) on the series with the newest value (the value is a timestamp).
    pub running_loras: Vec<String>,
    /// Adapters waiting: the same series' `waiting_lora_adapters`.
    pub waiting_loras: Vec<String>,
    /// Adapters the pod can hold at once: the same series' `max_lora`.
    pub max_lora: Option<u32>,
    /// Tokens per KV block: `vllm:cache_config_info`'s `block_size` (SGLang:
    /// `sglang:cache_config_info`'s `page_size`).
    pub block_size: Option<u32>,
    /// KV blocks the engine has: `vllm:cache_config_info`'s `num_gpu_blocks` (absent, or
    /// `None`, before vLLM has profiled its memory; SGLang: `sglang:cache_config_info`'s
    /// `num_pages`).
    pub kv_blocks: Option<u64>,
    /// The prompts the pod has finished since it started, as it counts them:
    /// `vllm:request_prompt_tokens`, a histogram observed once per finished request (its
    /// `_sum` and `_count`, summed over series; SGLang: `sglang:prompt_tokens_total` and
    /// `sglang:num_requests_total`). What teaches each pod's bytes per token when answers
    /// carry no usage.
    pub prompts: Option<PromptTotals>,
}

/// A pod's running totals of the prompts it finished.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PromptTotals {
    /// Their tokens, as its tokenizer counted them.
    pub tokens: f64,
    /// How many.
    pub requests: f64,
}

impl PodLoad {
    /// Tokens the pod's KV cache holds at most (`kv_blocks × block_size`), when it says:
    /// what sizes the approximate index's guess of it (`autoTune`).
    pub fn kv_capacity_tokens(&self) -> Option<u64> {
        Some(self.kv_blocks?.saturating_mul(u64::from(self.block_size?)))
    }
}

/// A successful scrape and when it was taken.
#[derive(Clone, Debug, PartialEq)]
pub struct Scraped {
    /// What it said.
    pub load: PodLoad,
    /// When its answer was read (the caller's clock).
    pub at: Instant,
    /// Requests this router had routed to the endpoint when the answer was stored.
    pub routed_before: u64,
    /// Of those, the ones whose response had ended.
    pub ended_before: u64,
}

/// The last scrape, checked fresh; derefs to its [`PodLoad`]. Holding it pins that scrape
/// (an `arc_swap` guard: no allocation, no lock), so read it and let it go.
#[derive(Debug)]
pub struct FreshLoad {
    pub(crate) guard: arc_swap::Guard<Option<Arc<Scraped>>>,
    pub(crate) at: Instant,
    pub(crate) routed_since: u64,
    pub(crate) ended_since: u64,
}

/// Why a body could not be read as a model server's load.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Not Prometheus text.
    #[error("not Prometheus text: {0}")]
    Syntax(#[from] SyntaxError),
    /// Prometheus text, but without a family every supported model server exports.
    #[error("no {0} series (neither vLLM's nor SGLang's name)")]
    Missing(&'static str),
}

/// Reads the load out of a `/metrics` body. Lines must all be valid Prometheus text (one bad
/// line fails the whole scrape, as it would in Prometheus), and the queue, running and
/// KV-cache families must be there under vLLM's or SGLang's names. Non-finite values are
/// ignored, as if their series were absent.
pub fn parse_load(text: &str) -> Result<PodLoad, LoadError> {
    let mut acc = Acc::default();
    for sample in exposition::samples(text) {
        acc.add(sample?);
    }
    acc.finish()
}

impl FreshLoad {
    /// When the scrape was taken.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Requests this router routed to the endpoint after the scrape: the pod could not
    /// have counted them yet. The scrape plus these is the freshest view of the pod's
    /// queue a replica has (its own count sees only its share of the traffic, the scrape
    /// lags by up to an interval).
    pub fn routed_since(&self) -> u64 {
        self.routed_since
    }

    /// Requests of this router whose response ended after the scrape: the pod may have
    /// counted them running then, and they are gone now.
    pub fn ended_since(&self) -> u64 {
        self.ended_since
    }

    /// The pod's requests now, as near as a replica can tell: those it reported running and
    /// waiting, plus those this router sent it since, less those of this router's that
    /// ended since. Between two scrapes this follows the router's own traffic both ways
    /// (without the ended ones, every request answered since the scrape would still count,
    /// and a busy pod would look busier the longer since its scrape); other routers'
    /// traffic shows a scrape late.
    pub fn requests_now(&self) -> u64 {
        (u64::from(self.running) + u64::from(self.waiting) + self.routed_since)
            .saturating_sub(self.ended_since)
    }
}

impl Deref for FreshLoad {
    type Target = PodLoad;

    fn deref(&self) -> &PodLoad {
        /// Never read: a `FreshLoad` is only built around a guard holding `Some` (see
        /// `EndpointState::fresh_load`); a default rather than a panic if that ever broke.
        static EMPTY: PodLoad = PodLoad {
            waiting: 0,
            running: 0,
            kv_usage: 0.0,
            running_loras: Vec::new(),
            waiting_loras: Vec::new(),
            max_lora: None,
            block_size: None,
            kv_blocks: None,
            prompts: None,
        };
        self.guard.as_deref().map_or(&EMPTY, |s| &s.load)
    }
}

/// Whether a scrape taken at `at` still counts at `now`.
pub(crate) fn is_fresh(at: Instant, now: Instant, staleness: Duration) -> bool {
    now.saturating_duration_since(at) < staleness
}

/// Running totals over the samples of one body.
#[derive(Default)]
struct Acc<'a> {
    vllm_waiting: Sum,
    vllm_running: Sum,
    vllm_kv: Sum,
    vllm_kv_old: Sum,
    sglang_waiting: Sum,
    sglang_running: Sum,
    sglang_kv: Sum,
    /// The `vllm:lora_requests_info` sample with the largest (finite) value.
    lora: Option<Sample<'a>>,
    block_size: Option<u32>,
    kv_blocks: Option<u64>,
    prompt_tokens: Sum,
    prompt_requests: Sum,
    sglang_prompt_tokens: Sum,
    sglang_requests: Sum,
}

/// A family's finite values, summed and counted.
#[derive(Default, Clone, Copy)]
struct Sum {
    total: f64,
    n: u32,
}

impl Sum {
    fn add(&mut self, v: f64) {
        if v.is_finite() {
            self.total += v;
            self.n += 1;
        }
    }

    fn or(self, other: Sum) -> Sum {
        if self.n > 0 { self } else { other }
    }

    fn count(self, what: &'static str) -> Result<u32, LoadError> {
        if self.n == 0 {
            return Err(LoadError::Missing(what));
        }
        // `as` saturates: negative to 0, huge to u32::MAX.
        Ok(self.total.round() as u32)
    }

    fn fraction(self, what: &'static str) -> Result<f64, LoadError> {
        if self.n == 0 {
            return Err(LoadError::Missing(what));
        }
        let mean = self.total / f64::from(self.n);
        // A sum of finite values can still overflow to infinity.
        Ok(if mean.is_finite() {
            mean.clamp(0.0, 1.0)
        } else if mean > 0.0 {
            1.0
        } else {
            0.0
        })
    }
}

impl<'a> Acc<'a> {
    fn add(&mut self, s: Sample<'a>) {
        match s.name {
            "vllm:num_requests_waiting" => self.vllm_waiting.add(s.value),
            "vllm:num_requests_running" => self.vllm_running.add(s.value),
            "vllm:kv_cache_usage_perc" => self.vllm_kv.add(s.value),
            "vllm:gpu_cache_usage_perc" => self.vllm_kv_old.add(s.value),
            "sglang:num_queue_reqs" => self.sglang_waiting.add(s.value),
            "sglang:num_running_reqs" => self.sglang_running.add(s.value),
            "sglang:token_usage" => self.sglang_kv.add(s.value),
            "vllm:lora_requests_info" => {
                let newer = self.lora.is_none_or(|l| s.value > l.value);
                if s.value.is_finite() && newer {
                    self.lora = Some(s);
                }
            }
            "vllm:cache_config_info" => {
                self.block_size(&s, "block_size");
                self.kv_blocks(&s, "num_gpu_blocks");
            }
            "sglang:cache_config_info" => {
                self.block_size(&s, "page_size");
                self.kv_blocks(&s, "num_pages");
            }
            "vllm:request_prompt_tokens_sum" => self.prompt_tokens.add(s.value),
            "vllm:request_prompt_tokens_count" => self.prompt_requests.add(s.value),
            "sglang:prompt_tokens_total" => self.sglang_prompt_tokens.add(s.value),
            "sglang:num_requests_total" => self.sglang_requests.add(s.value),
            _ => {}
        }
    }

    fn kv_blocks(&mut self, s: &Sample<'a>, label: &str) {
        if self.kv_blocks.is_none() {
            self.kv_blocks = s.label(label).and_then(|v| v.trim().parse().ok());
        }
    }

    fn block_size(&mut self, s: &Sample<'a>, label: &str) {
        if self.block_size.is_none() {
            self.block_size = s.label(label).and_then(|v| v.trim().parse().ok());
        }
    }

    /// The pod's totals: vLLM's histogram, else SGLang's two counters (both counted as a
    /// request finishes), each pair only whole and each total finite and not negative (a sum
    /// of finite values can still overflow).
    fn prompts(&self) -> Option<PromptTotals> {
        let pair = |t: Sum, r: Sum| {
            let sane = |s: Sum| s.n > 0 && s.total.is_finite() && s.total >= 0.0;
            (sane(t) && sane(r)).then_some(PromptTotals {
                tokens: t.total,
                requests: r.total,
            })
        };
        let vllm = (self.prompt_tokens.n > 0 || self.prompt_requests.n > 0)
            .then(|| pair(self.prompt_tokens, self.prompt_requests));
        vllm.unwrap_or_else(|| pair(self.sglang_prompt_tokens, self.sglang_requests))
    }

    fn finish(self) -> Result<PodLoad, LoadError> {
        let mut load = PodLoad {
            waiting: self
                .vllm_waiting
                .or(self.sglang_waiting)
                .count("queue (vllm:num_requests_waiting)")?,
            running: self
                .vllm_running
                .or(self.sglang_running)
                .count("running (vllm:num_requests_running)")?,
            kv_usage: self
                .vllm_kv
                .or(self.vllm_kv_old)
                .or(self.sglang_kv)
                .fraction("KV-cache usage (vllm:kv_cache_usage_perc)")?,
            block_size: self.block_size,
            kv_blocks: self.kv_blocks,
            prompts: self.prompts(),
            ..PodLoad::default()
        };
        if let Some(lora) = self.lora {
            load.running_loras = adapters(lora.label("running_lora_adapters").as_deref());
            load.waiting_loras = adapters(lora.label("waiting_lora_adapters").as_deref());
            load.max_lora = lora.label("max_lora").and_then(|v| v.trim().parse().ok());
        }
        Ok(load)
    }
}

/// A comma-separated adapter list; empty names dropped (no allocation for an empty list).
fn adapters(list: Option<&str>) -> Vec<String> {
    list.into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
