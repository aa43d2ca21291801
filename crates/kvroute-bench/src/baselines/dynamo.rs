//! NVIDIA Dynamo's KV router, classic cost function (`lib/llm/src/kv_router/scheduler.rs`,
//! `DefaultWorkerSelector`; defaults from `KvRouterConfig::default`: `overlap_score_weight`
//! 1.0, `router_temperature` 0, `router_track_active_blocks` true). For each worker:
//!
//! - `prefill_blocks = (active prefill tokens + prompt tokens − overlap blocks × block size)
//!   / block size`, the overlap read from an index fed by the worker's KV events;
//! - `decode_blocks = active blocks + the prompt's blocks not already active there`;
//! - `logit = overlap_score_weight × prefill_blocks + decode_blocks`, lowest wins (at
//!   temperature 0). Dynamo breaks ties in hash-map order, which is arbitrary; here, seeded
//!   random among the tied.
//!
//! Active prefill tokens and active blocks are the router's own books, as in Dynamo: a
//! request's uncached prompt tokens count until its first token, its blocks until it ends.

use std::collections::HashMap;

use kvroute_core::BlockHash;

use crate::synthetic::Rng;

#[derive(Debug)]
struct Active {
    worker: usize,
    prefill_tokens: usize,
    blocks: Vec<BlockHash>,
    partial: bool,
}

#[derive(Debug, Default)]
struct Worker {
    prefill_tokens: usize,
    /// Blocks of requests in flight, counted once however many requests share them.
    blocks: HashMap<BlockHash, u32>,
    /// Partial last blocks of requests in flight (never shared).
    partial: usize,
}

/// Dynamo's cost-function router.
#[derive(Debug)]
pub struct DynamoCost {
    overlap_weight: f64,
    block_size: usize,
    workers: Vec<Worker>,
    active: HashMap<u64, Active>,
    rng: Rng,
}

impl DynamoCost {
    /// A router over `workers` workers whose engines cache `block_size`-token blocks.
    pub fn new(workers: usize, block_size: usize) -> Self {
        Self {
            overlap_weight: 1.0,
            block_size: block_size.max(1),
            workers: (0..workers).map(|_| Worker::default()).collect(),
            active: HashMap::new(),
            rng: Rng::new(0x6479_6e61_6d6f),
        }
    }

    /// Each worker's cost for a prompt of `prompt_tokens` tokens whose full blocks hash to
    /// `blocks`, given the cached prefix blocks (`overlap`) of each worker.
    fn logits(&self, prompt_tokens: usize, blocks: &[BlockHash], overlap: &[u32]) -> Vec<f64> {
        let bs = self.block_size as f64;
        let partial = !prompt_tokens.is_multiple_of(self.block_size);
        self.workers
            .iter()
            .zip(overlap)
            .map(|(w, &o)| {
                let cached = (o as usize * self.block_size).min(prompt_tokens);
                let prefill = (w.prefill_tokens + prompt_tokens - cached) as f64 / bs;
                let new = blocks.iter().filter(|b| !w.blocks.contains_key(b)).count();
                let decode = w.blocks.len() + w.partial + new + usize::from(partial);
                self.overlap_weight * prefill + decode as f64
            })
            .collect()
    }

    /// Routes request `id` and books it against the chosen worker.
    pub fn route(
        &mut self,
        id: u64,
        prompt_tokens: usize,
        blocks: &[BlockHash],
        overlap: &[u32],
    ) -> usize {
        let logits = self.logits(prompt_tokens, blocks, overlap);
        let best = logits.iter().copied().fold(f64::INFINITY, f64::min);
        let tied: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i] - best < 1e-9)
            .collect();
        let worker = tied[self.rng.below(tied.len() as u64) as usize];
        let cached = (overlap[worker] as usize * self.block_size).min(prompt_tokens);
        let w = &mut self.workers[worker];
        w.prefill_tokens += prompt_tokens - cached;
        for b in blocks {
            *w.blocks.entry(*b).or_default() += 1;
        }
        let partial = !prompt_tokens.is_multiple_of(self.block_size);
        w.partial += usize::from(partial);
        self.active.insert(
            id,
            Active {
                worker,
                prefill_tokens: prompt_tokens - cached,
                blocks: blocks.to_vec(),
                partial,
            },
        );
        worker
    }

    /// Request `id` produced its first token: its prefill is done.
    pub fn first_token(&mut self, id: u64) {
        if let Some(a) = self.active.get_mut(&id) {
            let w = &mut self.workers[a.worker];
            w.prefill_tokens -= std::mem::take(&mut a.prefill_tokens);
        }
    }

    /// Request `id` finished: its blocks are no longer active.
    pub fn finished(&mut self, id: u64) {
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        let w = &mut self.workers[a.worker];
        w.prefill_tokens -= a.prefill_tokens;
        w.partial -= usize::from(a.partial);
        for b in a.blocks {
            if let Some(n) = w.blocks.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    w.blocks.remove(&b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(ids: &[u64]) -> Vec<BlockHash> {
        ids.iter().map(|&i| BlockHash(i)).collect()
    }

    #[test]
    fn cost_is_prefill_blocks_plus_decode_blocks() {
        let mut d = DynamoCost::new(2, 16);
        // 40 tokens: 2 full blocks + a partial one. Worker 0 caches 2 blocks.
        // Worker 0: prefill (40 − 32) / 16 = 0.5, decode 2 + 1 = 3 → 3.5.
        // Worker 1: prefill 40 / 16 = 2.5, decode 3 → 5.5.
        assert_eq!(d.logits(40, &blocks(&[1, 2]), &[2, 0]), [3.5, 5.5]);
        assert_eq!(d.route(7, 40, &blocks(&[1, 2]), &[2, 0]), 0);
        // Worker 0 now has 8 prefill tokens and blocks {1, 2} + a partial active. The same
        // prompt again: prefill (8 + 8) / 16 = 1, decode 3 active + 0 new + 1 = 4 → 5;
        // worker 1 unchanged at 5.5.
        assert_eq!(d.logits(40, &blocks(&[1, 2]), &[2, 0]), [5.0, 5.5]);
        d.first_token(7);
        assert_eq!(d.logits(40, &blocks(&[1, 2]), &[2, 0]), [4.5, 5.5]);
        d.finished(7);
        assert_eq!(d.logits(40, &blocks(&[1, 2]), &[2, 0]), [3.5, 5.5]);
        assert!(d.active.is_empty() && d.workers[0].blocks.is_empty());
    }

    #[test]
    fn a_prefill_backlog_outweighs_an_overlap() {
        let mut d = DynamoCost::new(2, 16);
        let prompt: Vec<u64> = (0..10).collect();
        // Worker 0 holds the first block. Idle: 144 / 16 + 10 = 19 against 160 / 16 + 10 = 20.
        assert_eq!(d.logits(160, &blocks(&prompt), &[1, 0]), [19.0, 20.0]);
        // With 1,600 tokens of prefill queued, worker 0 costs 109 + 10.
        d.workers[0].prefill_tokens = 1600;
        assert_eq!(d.route(1, 160, &blocks(&prompt), &[1, 0]), 1);
    }

    #[test]
    fn ties_are_spread() {
        let mut d = DynamoCost::new(4, 16);
        let picked: std::collections::HashSet<usize> = (0..40)
            .map(|i| {
                let w = d.route(i, 16, &blocks(&[i]), &[0; 4]);
                d.finished(i);
                w
            })
            .collect();
        assert_eq!(picked.len(), 4);
    }
}
