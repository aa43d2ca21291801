use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::lora::LoraSlots;
use crate::offload::{BlockInfo, CpuTier};
use crate::pool::Pool;
use crate::profile::Profile;
use crate::prompt::PromptTokens;

/// A request's id, unique within one engine.
pub type RequestId = u64;

/// How many blocks ahead the engine asks for the memory of the block records and table
/// slots it is about to touch (measured: `docs/benchmarks.md`, simulator).
const AHEAD: usize = 32;

/// The parent of a chain's first block (vLLM's `NONE_HASH`, fixed as with a pinned
/// `PYTHONHASHSEED`).
const ROOT: u64 = 0x766c_6c6d_5f6e_6f6e;

/// A request as the engine receives it.
#[derive(Clone, Debug)]
pub struct SimRequest {
    /// Unique within the engine.
    pub id: RequestId,
    /// The prompt's token ids.
    pub prompt: PromptTokens,
    /// Tokens to generate (at least 1).
    pub max_tokens: usize,
    /// The LoRA adapter it names (vLLM reads it from the `model` field); `None`: the base
    /// model. Its blocks' hashes are rooted at the adapter, as vLLM's extra keys root them.
    pub lora: Option<Arc<str>>,
}

/// Where a block is kept (vLLM's `medium`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Medium {
    /// The GPU block pool (`"GPU"`).
    Gpu,
    /// Host memory, through the CPU offloading connector (`"CPU"`).
    Cpu,
}

impl Medium {
    /// The name vLLM sends.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
        }
    }
}

/// A KV-cache event, as vLLM's block pool reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Newly cached full blocks, in chain order.
    BlockStored {
        /// The engine's hashes of the blocks.
        block_hashes: Vec<u64>,
        /// The hash of the block before the first one; `None` at the root.
        parent_block_hash: Option<u64>,
        /// The blocks' tokens, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: usize,
        /// The adapter the chain is rooted at.
        lora_name: Option<Arc<str>>,
        /// Where the blocks are now kept.
        medium: Medium,
    },
    /// Cached blocks whose content was evicted.
    BlockRemoved {
        /// The engine's hashes of the blocks.
        block_hashes: Vec<u64>,
        /// The tier they left.
        medium: Medium,
    },
    /// The whole prefix cache was reset.
    AllBlocksCleared,
}

/// What one engine step did; its effects happen `duration_us` after it starts.
#[derive(Clone, Debug, Default)]
pub struct StepReport {
    /// How long the step takes.
    pub duration_us: u64,
    /// Prompt (or recomputed) tokens processed.
    pub prefill_tokens: usize,
    /// Sequences that generated a token this step.
    pub decode_seqs: usize,
    /// Requests whose first token this step produced.
    pub first_tokens: Vec<RequestId>,
    /// Requests that generated a token this step (first ones included).
    pub generated: Vec<RequestId>,
    /// Requests that finished this step.
    pub finished: Vec<Finished>,
    /// Requests preempted (their blocks freed, to be recomputed).
    pub preempted: Vec<RequestId>,
    /// KV events of the step, in order (empty unless events are enabled).
    pub events: Vec<KvEvent>,
}

/// A request that has generated all its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The request.
    pub id: RequestId,
    /// Its prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache at its (first) admission.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub output_tokens: usize,
}

#[derive(Debug)]
struct Seq {
    req: SimRequest,
    /// Hashes of the prompt's full blocks, computed on first admission.
    hashes: Vec<u64>,
    blocks: Vec<u32>,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Tokens generated so far.
    output: usize,
    /// Tokens to prefill: the prompt, plus generated tokens being recomputed after a
    /// preemption.
    prefill_len: usize,
    /// Prompt blocks already announced as cached by this sequence.
    cached_blocks: usize,
    /// Prompt tokens that were prefix-cache hits at first admission.
    cached_tokens: Option<usize>,
    started: bool,
    /// The prompt's KV was computed on a prefill pod and arrives with the request
    /// (disaggregated serving): at first admission its blocks are loaded, not computed.
    transferred: bool,
}

/// One simulated vLLM engine.
#[derive(Debug)]
pub struct Engine {
    profile: Profile,
    pool: Pool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    events: bool,
    prefix_queries: u64,
    prefix_hits: u64,
    loras: LoraSlots,
    cpu: CpuTier,
    /// With a CPU tier: every GPU-cached block's place in its chain, to offload it when it
    /// is evicted.
    gpu_blocks: HashMap<u64, BlockInfo>,
    /// Time this step spends beyond its forward pass: adapter loads, copies from host
    /// memory.
    extra_us: f64,
}

impl Engine {
    /// An idle engine with an empty cache. With `events`, steps report KV events.
    pub fn new(profile: Profile, events: bool) -> Self {
        Self {
            loras: LoraSlots::new(profile.max_loras),
            cpu: CpuTier::new(profile.cpu_blocks),
            pool: Pool::new(profile.kv_blocks),
            profile,
            waiting: VecDeque::new(),
            running: Vec::new(),
            events,
            prefix_queries: 0,
            prefix_hits: 0,
            gpu_blocks: HashMap::new(),
            extra_us: 0.0,
        }
    }

    /// The engine's profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Queues a request. Refuses (false) one whose prompt and output could never fit the
    /// KV cache, as vLLM refuses prompts over its maximum model length, and one naming an
    /// adapter on a pod that serves none.
    pub fn add(&mut self, req: SimRequest) -> bool {
        self.enqueue(req, false)
    }

    /// Queues a request whose prompt a prefill pod computed (disaggregated serving): at
    /// admission the blocks this engine lacks are loaded and cached, as vLLM's KV connector
    /// does on the decode side, and only the last prompt token is computed here. Refuses
    /// (false) what [`Engine::add`] refuses.
    pub fn add_transferred(&mut self, req: SimRequest) -> bool {
        self.enqueue(req, true)
    }

    fn enqueue(&mut self, req: SimRequest, transferred: bool) -> bool {
        if req.lora.is_some() && self.profile.max_loras == 0 {
            return false;
        }
        let prefill_len = req.prompt.len().max(1);
        let fits = prefill_len
            .checked_add(req.max_tokens)
            .is_some_and(|t| t.div_ceil(self.profile.block_size) <= self.profile.kv_blocks);
        if !fits {
            return false;
        }
        self.waiting.push_back(Seq {
            req,
            hashes: Vec::new(),
            blocks: Vec::new(),
            computed: 0,
            output: 0,
            prefill_len,
            cached_blocks: 0,
            cached_tokens: None,
            started: false,
            transferred,
        });
        true
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Requests waiting to be admitted (`vllm:num_requests_waiting`).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and not finished (`vllm:num_requests_running`).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The adapters of the running requests, sorted (`vllm:lora_requests_info`'s
    /// `running_lora_adapters`).
    pub fn running_loras(&self) -> Vec<Arc<str>> {
        distinct(self.running.iter().filter_map(|s| s.req.lora.as_ref()))
    }

    /// The adapters of the waiting requests, sorted (`waiting_lora_adapters`).
    pub fn waiting_loras(&self) -> Vec<Arc<str>> {
        distinct(self.waiting.iter().filter_map(|s| s.req.lora.as_ref()))
    }

    /// Adapters loaded into the GPU so far.
    pub fn lora_loads(&self) -> u64 {
        self.loras.loads()
    }

    /// Blocks held in host memory (the CPU tier).
    pub fn cpu_blocks(&self) -> usize {
        self.cpu.len()
    }

    /// Share of KV blocks in use by running requests (`vllm:kv_cache_usage_perc`).
    pub fn kv_usage(&self) -> f64 {
        self.pool.used_blocks() as f64 / self.pool.capacity().max(1) as f64
    }

    /// Prompt tokens of `prompt` this engine would serve from its prefix cache if it were
    /// admitted now (whole blocks, at most all but the last token, as `admit` counts them).
    /// Reads nothing a real router could: what a greedy oracle asks every pod.
    pub fn cached_prefix_tokens(&self, prompt: &PromptTokens) -> usize {
        let bs = self.profile.block_size;
        let max_hit_blocks = prompt.len().max(1).saturating_sub(1) / bs;
        prompt
            .block_hashes(bs, ROOT)
            .iter()
            .take(max_hit_blocks)
            .take_while(|h| self.pool.lookup(**h).is_some())
            .count()
            * bs
    }

    /// Prompt tokens still to prefill: every waiting request's whole prompt and the rest of
    /// every running one's (what a greedy oracle counts as the queue ahead of a request).
    pub fn queued_prefill_tokens(&self) -> usize {
        let waiting: usize = self
            .waiting
            .iter()
            .map(|s| s.prefill_len - s.computed.min(s.prefill_len))
            .sum();
        let running: usize = self
            .running
            .iter()
            .map(|s| s.prefill_len.saturating_sub(s.computed))
            .sum();
        waiting + running
    }

    /// Prompt tokens looked up in, and found in, the prefix cache so far
    /// (`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits`).
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// The content hashes currently cached, sorted (for comparing engines).
    pub fn cached_hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.pool.hashes().collect();
        v.sort_unstable();
        v
    }

    /// The content hashes held in host memory, sorted.
    pub fn cpu_hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.cpu.hashes().collect();
        v.sort_unstable();
        v
    }

    /// Forgets every cached block (vLLM's `reset_prefix_cache`); reports
    /// `AllBlocksCleared`.
    pub fn clear_cache(&mut self) -> Vec<KvEvent> {
        self.pool.clear();
        self.cpu.clear();
        self.gpu_blocks.clear();
        // Blocks still in use are cached again as their sequences go on.
        for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            s.cached_blocks = 0;
        }
        if self.events {
            vec![KvEvent::AllBlocksCleared]
        } else {
            Vec::new()
        }
    }

    /// Runs one scheduler step: decides what runs, applies its effects, and reports how
    /// long it takes. Decode tokens of running requests go first, then their unfinished
    /// prefills, then new requests, within `max_num_batched_tokens` (chunked prefill) and
    /// `max_num_seqs`. A sequence that needs a block when none is free preempts the most
    /// recently admitted one, as vLLM's V1 scheduler does.
    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport::default();
        let mut budget = self.profile.max_batched_tokens;
        let bs = self.profile.block_size;
        let mut plan: Vec<usize> = Vec::new(); // tokens per running sequence, by index
        let mut preempted_any = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let want = if s.computed < s.prefill_len {
                (s.prefill_len - s.computed).min(budget)
            } else {
                1
            };
            let need = (s.computed + want)
                .div_ceil(bs)
                .saturating_sub(s.blocks.len());
            while self.pool.free_blocks() < need && self.running.len() > i + 1 {
                self.preempt_last(&mut report);
                preempted_any = true;
            }
            if self.pool.free_blocks() < need {
                // Not even alone does it fit: it waits for blocks to free up.
                self.preempt_last(&mut report);
                preempted_any = true;
                break;
            }
            self.allocate(i, need, &mut report);
            plan.push(want);
            budget -= want;
            i += 1;
        }

        // The adapters the batch uses: those running, then those admitted (at most
        // `max_loras`; a request whose adapter cannot join waits).
        let mut batch_loras = distinct(self.running.iter().filter_map(|s| s.req.lora.as_ref()));
        while !preempted_any
            && budget > 0
            && self.running.len() < self.profile.max_num_seqs
            && !self.waiting.is_empty()
        {
            if !self.admit(&mut budget, &mut plan, &mut batch_loras, &mut report) {
                break;
            }
        }
        let loads = self.loras.hold(&batch_loras);
        self.extra_us += loads as f64 * self.profile.lora_load_us;

        // Execute the plan. Attention's work (with the profile's context cost): each prompt
        // token prefilled attends to every token up to itself, a decode reads its context.
        let mut done = Vec::new();
        let (mut attended, mut decode_context) = (0u64, 0u64);
        for (idx, &tokens) in plan.iter().enumerate() {
            let s = &mut self.running[idx];
            let was_prefill = s.computed < s.prefill_len;
            let (before, chunk) = (s.computed as u64, tokens as u64);
            s.computed += tokens;
            if was_prefill {
                report.prefill_tokens += tokens;
                attended += chunk * before + chunk * (chunk + 1) / 2;
            } else {
                report.decode_seqs += 1;
                decode_context += before;
            }
            let full = (s.computed.min(s.req.prompt.len()) / bs).min(s.hashes.len());
            if full > s.cached_blocks {
                let (from, to) = (s.cached_blocks, full);
                s.cached_blocks = full;
                self.cache_blocks(idx, from, to, &mut report);
            }
            let s = &mut self.running[idx];
            if s.computed >= s.prefill_len {
                s.output += 1;
                report.generated.push(s.req.id);
                if !s.started {
                    s.started = true;
                    report.first_tokens.push(s.req.id);
                }
                if s.output >= s.req.max_tokens.max(1) {
                    done.push(idx);
                }
            }
        }
        for &idx in done.iter().rev() {
            let s = self.running.remove(idx);
            for (i, &b) in s.blocks.iter().enumerate().rev() {
                if let Some(&ahead) = i.checked_sub(AHEAD).and_then(|j| s.blocks.get(j)) {
                    self.pool.prefetch(None, Some(ahead));
                }
                self.pool.release(b);
            }
            report.finished.push(Finished {
                id: s.req.id,
                prompt_tokens: s.req.prompt.len(),
                cached_tokens: s.cached_tokens.unwrap_or(0),
                output_tokens: s.output,
            });
        }
        report.finished.reverse();
        if report.prefill_tokens > 0 || report.decode_seqs > 0 {
            report.duration_us = self
                .profile
                .step_us(report.prefill_tokens, report.decode_seqs)
                + self.profile.context_us(attended, decode_context).round() as u64;
        }
        let extra = std::mem::take(&mut self.extra_us);
        if report.duration_us > 0 {
            report.duration_us += extra.round() as u64;
        }
        report
    }

    /// Admits the first waiting request whose adapter the batch can take (`batch_loras`, to
    /// which it adds) if its blocks fit; false when it does not, or none can join. Blocks
    /// found in host memory after the GPU's hits are copied back instead of prefilled.
    fn admit(
        &mut self,
        budget: &mut usize,
        plan: &mut Vec<usize>,
        batch_loras: &mut Vec<Arc<str>>,
        report: &mut StepReport,
    ) -> bool {
        let bs = self.profile.block_size;
        let Some(at) = self
            .waiting
            .iter()
            .position(|s| self.loras.admits(batch_loras, s.req.lora.as_ref()))
        else {
            return false;
        };
        let Some(s) = self.waiting.get_mut(at) else {
            return false;
        };
        if s.hashes.is_empty() {
            s.hashes = s.req.prompt.block_hashes(bs, root(s.req.lora.as_deref()));
        }
        // As vLLM, a hit covers at most all but the last prompt token, in whole blocks: the
        // last token is always computed so its logits exist, and a fully cached prompt
        // recomputes its last block.
        let max_hit_blocks = (s.prefill_len - 1) / bs;
        let hits: Vec<u32> = s
            .hashes
            .iter()
            .take(max_hit_blocks)
            .map_while(|h| self.pool.lookup(*h))
            .collect();
        let end = max_hit_blocks.min(s.hashes.len()).max(hits.len());
        let cpu_hits = s.hashes[hits.len()..end]
            .iter()
            .take_while(|h| self.cpu.contains(**h))
            .count();
        // A transferred prompt brings the blocks this engine lacks (on first admission; a
        // preempted one recomputes as any other).
        let loaded = if s.transferred && s.cached_tokens.is_none() {
            max_hit_blocks.saturating_sub(hits.len() + cpu_hits)
        } else {
            0
        };
        let hit_tokens = (hits.len() + cpu_hits) * bs;
        let computed = hit_tokens + loaded * bs;
        let want = (s.prefill_len - computed).min(*budget);
        let need_new = (computed + want).div_ceil(bs).saturating_sub(hits.len());
        // Hit blocks nobody uses sit in the free queue: taking them leaves fewer for new ones.
        let hits_free = hits.iter().filter(|&&b| self.pool.is_free(b)).count();
        if self.pool.free_blocks() < need_new + hits_free {
            return false;
        }
        let Some(mut s) = self.waiting.remove(at) else {
            return false;
        };
        if s.cached_tokens.is_none() {
            let prompt = s.req.prompt.len();
            self.prefix_queries += prompt as u64;
            self.prefix_hits += hit_tokens.min(prompt) as u64;
            s.cached_tokens = Some(hit_tokens.min(prompt));
        }
        if let Some(a) = &s.req.lora
            && !batch_loras.contains(a)
        {
            batch_loras.push(Arc::clone(a));
        }
        // Copies to be made: kept in host memory while this admission evicts into it.
        for h in &s.hashes[hits.len()..hits.len() + cpu_hits] {
            self.cpu.touch(*h);
        }
        for &b in &hits {
            self.pool.touch(b);
        }
        let held = hits.len();
        s.blocks = hits;
        s.cached_blocks = held;
        s.computed = computed;
        self.running.push(s);
        let idx = self.running.len() - 1;
        self.allocate(idx, need_new, report);
        if cpu_hits + loaded > 0 {
            // Copied back from host memory, or moved from the prefill pod, into new GPU
            // blocks, which are cached (and announced) at once.
            let to = held + cpu_hits + loaded;
            self.cache_blocks(idx, held, to, report);
            self.running[idx].cached_blocks = to;
            self.extra_us += (cpu_hits * bs) as f64 * self.profile.cpu_load_us_per_token;
        }
        plan.push(want);
        *budget -= want;
        true
    }

    fn allocate(&mut self, idx: usize, n: usize, report: &mut StepReport) {
        let mut removed = Vec::new();
        for _ in 0..n {
            if let Some((b, evicted)) = self.pool.allocate() {
                self.running[idx].blocks.push(b);
                if let Some(h) = evicted {
                    removed.push(h);
                }
            }
        }
        if removed.is_empty() {
            return;
        }
        if self.profile.cpu_blocks > 0 {
            self.offload(&removed, report);
        }
        if self.events {
            report.events.push(KvEvent::BlockRemoved {
                block_hashes: removed,
                medium: Medium::Gpu,
            });
        }
    }

    /// Moves blocks evicted from the GPU to host memory, as vLLM's CPU offloading keeps
    /// them, announcing each (before the GPU's removal, so a consumer never loses track of
    /// the block in between) and what host memory drops to make room.
    fn offload(&mut self, evicted: &[u64], report: &mut StepReport) {
        let bs = self.profile.block_size;
        let mut dropped = Vec::new();
        for h in evicted {
            let Some(info) = self.gpu_blocks.remove(h) else {
                continue;
            };
            let event = self.events.then(|| KvEvent::BlockStored {
                block_hashes: vec![*h],
                parent_block_hash: info.parent,
                token_ids: info.prompt.tokens(info.index * bs, (info.index + 1) * bs),
                block_size: bs,
                lora_name: info.lora.clone(),
                medium: Medium::Cpu,
            });
            dropped.clear();
            let kept = self.cpu.insert(*h, info, &mut dropped);
            // What made room first: the block may be one dropped a moment ago.
            if self.events && !dropped.is_empty() {
                report.events.push(KvEvent::BlockRemoved {
                    block_hashes: dropped.clone(),
                    medium: Medium::Cpu,
                });
            }
            if kept && let Some(e) = event {
                report.events.push(e);
            }
        }
    }

    fn cache_blocks(&mut self, idx: usize, from: usize, to: usize, report: &mut StepReport) {
        let bs = self.profile.block_size;
        let mut run: Vec<usize> = Vec::new();
        for b in from..to {
            let s = &self.running[idx];
            if b + AHEAD < to {
                self.pool
                    .prefetch(Some(s.hashes[b + AHEAD]), Some(s.blocks[b + AHEAD]));
            }
            let (block, hash) = (s.blocks[b], s.hashes[b]);
            if self.pool.cache(block, hash) {
                run.push(b);
                if self.profile.cpu_blocks > 0 {
                    let info = BlockInfo {
                        parent: b.checked_sub(1).map(|p| s.hashes[p]),
                        prompt: s.req.prompt.clone(),
                        index: b,
                        lora: s.req.lora.clone(),
                    };
                    self.gpu_blocks.insert(hash, info);
                }
            }
        }
        if !self.events || run.is_empty() {
            return;
        }
        // One event per consecutive run, as vLLM's `cache_full_blocks` reports.
        let s = &self.running[idx];
        let mut start = 0;
        while start < run.len() {
            let mut end = start + 1;
            while end < run.len() && run[end] == run[end - 1] + 1 {
                end += 1;
            }
            let (first, last) = (run[start], run[end - 1]);
            report.events.push(KvEvent::BlockStored {
                block_hashes: s.hashes[first..=last].to_vec(),
                parent_block_hash: first.checked_sub(1).map(|p| s.hashes[p]),
                token_ids: s.req.prompt.tokens(first * bs, (last + 1) * bs),
                block_size: bs,
                lora_name: s.req.lora.clone(),
                medium: Medium::Gpu,
            });
            start = end;
        }
    }

    /// Frees the most recently admitted sequence's blocks and puts it back at the front of
    /// the queue, to recompute its prompt and what it generated.
    fn preempt_last(&mut self, report: &mut StepReport) {
        let Some(mut s) = self.running.pop() else {
            return;
        };
        for &b in s.blocks.iter().rev() {
            self.pool.release(b);
        }
        s.blocks.clear();
        s.prefill_len = s.req.prompt.len().max(1) + s.output;
        s.computed = 0;
        s.cached_blocks = 0;
        report.preempted.push(s.req.id);
        self.waiting.push_front(s);
    }
}

/// The parent of the first block of a chain for `lora` (the base model's: [`ROOT`]): vLLM
/// puts the adapter's name in the extra keys of every block, so an adapter's blocks never
/// match the base model's.
fn root(lora: Option<&str>) -> u64 {
    lora.map_or(ROOT, |name| xxh3_64_with_seed(name.as_bytes(), ROOT))
}

/// The distinct adapters of `loras`, sorted.
fn distinct<'a>(loras: impl Iterator<Item = &'a Arc<str>>) -> Vec<Arc<str>> {
    let mut v: Vec<Arc<str>> = loras.cloned().collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests;
