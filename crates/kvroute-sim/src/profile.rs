/// Loading a LoRA adapter into the GPU, µs: a rank-16 adapter of an 8B model is tens of MB,
/// read from host memory or local disk and copied in (an estimate: `docs/simulator.md`).
const LORA_LOAD_US: f64 = 25_000.0;

/// How one simulated pod performs: the figures of a model on some hardware, each with its
/// source in `docs/simulator.md`.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Name, `<hardware>-<model>[-tp<N>]`.
    pub name: &'static str,
    /// Tokens per KV block (vLLM's default 16).
    pub block_size: usize,
    /// KV-cache capacity in blocks.
    pub kv_blocks: usize,
    /// Most sequences in one batch (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one step (vLLM's `max_num_batched_tokens`, chunked prefill).
    pub max_batched_tokens: usize,
    /// Fixed cost of a forward pass (weights streamed once), µs.
    pub step_base_us: f64,
    /// Extra cost per sequence decoding in the step, µs.
    pub decode_us_per_seq: f64,
    /// Cost per prompt token prefilled in the step, µs.
    pub prefill_us_per_token: f64,
    /// LoRA adapters one step's batch can use, and the GPU holds, at once (vLLM's
    /// `--max-loras`); 0: the pod serves no adapters.
    pub max_loras: usize,
    /// Loading an adapter that is not held into the GPU, µs: added to the step that first
    /// runs it.
    pub lora_load_us: f64,
    /// Host-memory KV blocks that blocks evicted from the GPU move to (vLLM's CPU offloading
    /// connector); 0: no second tier.
    pub cpu_blocks: usize,
    /// Copying a prefix-cache hit back from host memory, µs per token (cheaper than
    /// prefilling it again).
    pub cpu_load_us_per_token: f64,
    /// What attention costs beyond the linear figures above, paid only with
    /// [`Profile::with_context_cost`]: the figures above were fit on short contexts, where a
    /// step's cost hardly depends on how long each sequence's context is.
    pub context: ContextCost,
    /// Whether steps pay [`Profile::context`] (`--context-cost`).
    pub context_cost: bool,
}

/// Attention's cost per token of context, from the model's shape and the hardware's
/// figures (`docs/simulator.md`, "Context-dependent cost"): each prompt token prefilled
/// attends to every token before it, and each decoding sequence reads its whole KV cache
/// every step. Both grow with the context, so a pod of long conversations steps slower and a
/// turn over a long cached history costs more than the same tokens alone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ContextCost {
    /// µs per prompt token prefilled, per 1,000 tokens it attends to (itself included).
    pub prefill_us_per_ktoken: f64,
    /// µs per decoding sequence, per 1,000 tokens of its context.
    pub decode_us_per_ktoken: f64,
}

impl Profile {
    /// Duration of a step that prefills `prefill_tokens` and decodes `decode_seqs`.
    pub fn step_us(&self, prefill_tokens: usize, decode_seqs: usize) -> u64 {
        let us = self.step_base_us
            + self.decode_us_per_seq * decode_seqs as f64
            + self.prefill_us_per_token * prefill_tokens as f64;
        us.round().max(1.0) as u64
    }

    /// What a step's attention adds with [`Profile::with_context_cost`], µs: `attended` is
    /// the (prompt token, token it attends to) pairs the step prefills, `decode_context` the
    /// context tokens of the sequences it decodes, summed. 0 without it.
    pub fn context_us(&self, attended: u64, decode_context: u64) -> f64 {
        if !self.context_cost {
            return 0.0;
        }
        (self.context.prefill_us_per_ktoken * attended as f64
            + self.context.decode_us_per_ktoken * decode_context as f64)
            / 1000.0
    }

    /// The same pod paying attention's cost per token of context ([`Profile::context`]):
    /// a pool whose pods slow down with long contexts, as real ones do, to check that what
    /// routing was tuned on does not hinge on the linear model (`--context-cost`).
    pub fn with_context_cost(mut self) -> Self {
        self.context_cost = true;
        self
    }

    /// The same pod `factor` times slower at every step (a previous GPU generation, or one
    /// sharing its GPU): its step, decode and prefill costs multiplied, its capacity kept.
    pub fn slowed(mut self, factor: f64) -> Self {
        self.step_base_us *= factor;
        self.decode_us_per_seq *= factor;
        self.prefill_us_per_token *= factor;
        self.context.prefill_us_per_ktoken *= factor;
        self.context.decode_us_per_ktoken *= factor;
        self
    }

    /// The profiles this build knows, by name.
    pub fn named(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|p| p.name == name)
    }

    /// Every built-in profile.
    pub fn all() -> Vec<Self> {
        vec![Self::h100_llama31_8b(), Self::mi300x_llama31_70b_tp4()]
    }

    /// Llama 3.1 8B (bf16) on one H100 80 GB SXM with vLLM's V1 defaults. Figures and
    /// sources: `docs/simulator.md`.
    pub fn h100_llama31_8b() -> Self {
        Self {
            name: "h100-llama3.1-8b",
            block_size: 16,
            kv_blocks: 26_306,
            max_num_seqs: 1024,
            max_batched_tokens: 8192,
            step_base_us: 7_400.0,
            decode_us_per_seq: 50.0,
            prefill_us_per_token: 38.0,
            max_loras: 0,
            lora_load_us: LORA_LOAD_US,
            cpu_blocks: 0,
            // 128 KiB of KV per token (32 layers x 8 KV heads x 128 x 2 x bf16) over ~25 GB/s
            // of PCIe 5 host-to-device copy.
            cpu_load_us_per_token: 5.0,
            // At the MFU and bandwidth of the figures above: 4 x 32 layers x 4,096 FLOP a
            // (query, key) pair, 128 KiB of KV read a context token.
            context: ContextCost {
                prefill_us_per_ktoken: 1.18,
                decode_us_per_ktoken: 48.9,
            },
            context_cost: false,
        }
    }

    /// Llama 3.1 70B (bf16) on four MI300X 192 GB, tensor parallel 4, vLLM's V1 defaults:
    /// the setting of the published 3x throughput / 2x TTFT prefix-routing result.
    pub fn mi300x_llama31_70b_tp4() -> Self {
        Self {
            name: "mi300x-llama3.1-70b-tp4",
            block_size: 16,
            kv_blocks: 108_000,
            max_num_seqs: 1024,
            max_batched_tokens: 8192,
            step_base_us: 14_000.0,
            decode_us_per_seq: 310.0,
            prefill_us_per_token: 80.0,
            max_loras: 0,
            lora_load_us: LORA_LOAD_US,
            cpu_blocks: 0,
            // 320 KiB of KV per token (80 layers), a quarter per GPU, copied in parallel.
            cpu_load_us_per_token: 3.3,
            // 4 x 80 layers x 8,192 FLOP a pair at the prefill MFU above; a quarter of
            // 320 KiB read a context token on each GPU at 0.8 x 5.3 TB/s.
            context: ContextCost {
                prefill_us_per_ktoken: 1.43,
                decode_us_per_ktoken: 19.3,
            },
            context_cost: false,
        }
    }

    /// The same figures with cache blocks of `block_size` tokens (capacity kept in tokens):
    /// coarser blocks make virtual time much faster where prompts share content only in
    /// large units (a Mooncake trace's 512 tokens), at the cost of caching no partial unit.
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        let tokens = self.kv_blocks * self.block_size;
        let cpu_tokens = self.cpu_blocks * self.block_size;
        self.block_size = block_size.max(1);
        self.kv_blocks = tokens / self.block_size;
        self.cpu_blocks = cpu_tokens / self.block_size;
        self
    }

    /// The same figures serving LoRA adapters, `max_loras` at once (`--max-loras`).
    pub fn with_max_loras(mut self, max_loras: usize) -> Self {
        self.max_loras = max_loras;
        self
    }

    /// The same figures with a second, slower tier of `tokens` tokens of host memory that
    /// blocks evicted from the GPU move to (vLLM's CPU offloading, `cpu_bytes_to_use`).
    pub fn with_cpu_offload_tokens(mut self, tokens: usize) -> Self {
        self.cpu_blocks = tokens / self.block_size.max(1);
        self
    }

    /// A tiny profile for hand-computed tests: 4-token blocks, round numbers.
    pub fn tiny(kv_blocks: usize, max_num_seqs: usize, max_batched_tokens: usize) -> Self {
        Self {
            name: "tiny",
            block_size: 4,
            kv_blocks,
            max_num_seqs,
            max_batched_tokens,
            step_base_us: 100.0,
            decode_us_per_seq: 10.0,
            prefill_us_per_token: 1.0,
            max_loras: 0,
            lora_load_us: 50.0,
            cpu_blocks: 0,
            cpu_load_us_per_token: 0.25,
            context: ContextCost {
                prefill_us_per_ktoken: 1.0,
                decode_us_per_ktoken: 10.0,
            },
            context_cost: false,
        }
    }
}
