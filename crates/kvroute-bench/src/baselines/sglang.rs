//! SGLang router's `cache_aware` policy (`sgl-router/src/policies/cache_aware.rs`,
//! `CacheAwarePolicy::select_worker`; tree in `sgl-router/src/tree.rs`), with the current
//! command-line defaults (`router_args.py`): `cache_threshold` 0.3, `balance_abs_threshold`
//! 64, `balance_rel_threshold` 1.5, `eviction_interval_secs` 120, `max_tree_size` 2^26.
//!
//! SGLang's tree holds request *text*, one character per edge symbol; the bench's requests
//! are token ids, so the tree holds token ids and sizes are counted in tokens, at 4
//! characters a token (the Inference Extension's estimate): 2^26 characters = 2^24 tokens.

use std::collections::HashMap;

/// The policy's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SglangConfig {
    /// Route to the deepest match's worker only if `matched / prompt` exceeds this.
    pub cache_threshold: f64,
    /// Imbalanced if `max − min` load exceeds this …
    pub balance_abs_threshold: usize,
    /// … and `max > min × this`.
    pub balance_rel_threshold: f64,
    /// How often each worker's tree share is trimmed to `max_tree_size`, microseconds.
    pub eviction_interval_us: u64,
    /// Tokens each worker may own in the tree.
    pub max_tree_tokens: usize,
}

impl Default for SglangConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval_us: 120_000_000,
            max_tree_tokens: (1 << 26) / 4,
        }
    }
}

#[derive(Debug)]
struct Node {
    /// The edge's tokens (the root's is empty).
    label: Vec<u32>,
    parent: usize,
    children: HashMap<u32, usize>,
    /// Workers holding this node, in the order they first did, with last access times.
    tenants: Vec<(usize, u64)>,
}

/// The `cache_aware` router: one radix tree shared by every worker, each node listing the
/// workers it was routed to.
#[derive(Debug)]
pub struct SglangCacheAware {
    config: SglangConfig,
    nodes: Vec<Node>,
    free: Vec<usize>,
    /// Tokens of the tree each worker holds (`tenant_char_count`).
    tenant_tokens: Vec<usize>,
    next_eviction_us: u64,
}

impl SglangCacheAware {
    /// A router over `workers` workers.
    pub fn new(config: SglangConfig, workers: usize) -> Self {
        Self {
            config,
            nodes: vec![Node {
                label: Vec::new(),
                parent: 0,
                children: HashMap::new(),
                tenants: Vec::new(),
            }],
            free: Vec::new(),
            tenant_tokens: vec![0; workers],
            next_eviction_us: config.eviction_interval_us,
        }
    }

    /// The worker for `prompt` at `now_us`, given each worker's in-flight requests; the
    /// prompt is then recorded under that worker.
    pub fn route(&mut self, now_us: u64, prompt: &[u32], loads: &[usize]) -> usize {
        while now_us >= self.next_eviction_us {
            self.evict();
            self.next_eviction_us += self.config.eviction_interval_us.max(1);
        }
        let (Some(&min), Some(&max)) = (loads.iter().min(), loads.iter().max()) else {
            return 0;
        };
        let imbalanced = max - min > self.config.balance_abs_threshold
            && max as f64 > min as f64 * self.config.balance_rel_threshold;
        let worker = if imbalanced {
            least(loads)
        } else {
            let (matched, tenant) = self.prefix_match(prompt);
            let rate = matched as f64 / prompt.len().max(1) as f64;
            match tenant {
                Some(t) if rate > self.config.cache_threshold => t,
                _ => least(&self.tenant_tokens),
            }
        };
        self.insert(prompt, worker, now_us);
        worker
    }

    /// Tokens matched from the start, and the first worker listed at the deepest node
    /// reached (a partial edge match counts its matched tokens and reaches that node).
    fn prefix_match(&self, text: &[u32]) -> (usize, Option<usize>) {
        let mut node = 0;
        let mut i = 0;
        while i < text.len() {
            let Some(&child) = self.nodes[node].children.get(&text[i]) else {
                break;
            };
            let label = &self.nodes[child].label;
            let shared = common(label, &text[i..]);
            i += shared;
            node = child;
            if shared < label.len() {
                break;
            }
        }
        (i, self.nodes[node].tenants.first().map(|&(t, _)| t))
    }

    fn insert(&mut self, text: &[u32], worker: usize, now_us: u64) {
        let mut node = 0;
        let mut i = 0;
        while i < text.len() {
            let next = match self.nodes[node].children.get(&text[i]) {
                Some(&child) => {
                    let shared = common(&self.nodes[child].label, &text[i..]);
                    if shared < self.nodes[child].label.len() {
                        self.split(child, shared)
                    } else {
                        child
                    }
                }
                None => {
                    let child = self.alloc(Node {
                        label: text[i..].to_vec(),
                        parent: node,
                        children: HashMap::new(),
                        tenants: Vec::new(),
                    });
                    self.nodes[node].children.insert(text[i], child);
                    child
                }
            };
            i += self.nodes[next].label.len();
            self.touch(next, worker, now_us);
            node = next;
        }
    }

    /// Splits `node` after `at` tokens of its label; returns the new upper half, which
    /// inherits the node's workers.
    fn split(&mut self, node: usize, at: usize) -> usize {
        let lower_label = self.nodes[node].label.split_off(at);
        let upper_label = std::mem::take(&mut self.nodes[node].label);
        let parent = self.nodes[node].parent;
        let upper = self.alloc(Node {
            label: upper_label,
            parent,
            children: HashMap::new(),
            tenants: self.nodes[node].tenants.clone(),
        });
        let first = self.nodes[upper].label[0];
        self.nodes[parent].children.insert(first, upper);
        self.nodes[upper].children.insert(lower_label[0], node);
        self.nodes[node].label = lower_label;
        self.nodes[node].parent = upper;
        upper
    }

    fn touch(&mut self, node: usize, worker: usize, now_us: u64) {
        let len = self.nodes[node].label.len();
        let tenants = &mut self.nodes[node].tenants;
        match tenants.iter_mut().find(|(t, _)| *t == worker) {
            Some(entry) => entry.1 = now_us,
            None => {
                tenants.push((worker, now_us));
                self.tenant_tokens[worker] += len;
            }
        }
    }

    fn alloc(&mut self, node: Node) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// `evict_tenant_by_size`: each worker over its share loses its least recently used
    /// leaves (nodes it holds whose children it does not), oldest first, until it fits.
    fn evict(&mut self) {
        for worker in 0..self.tenant_tokens.len() {
            if self.tenant_tokens[worker] <= self.config.max_tree_tokens {
                continue;
            }
            let holds = |n: &Node| n.tenants.iter().any(|&(t, _)| t == worker);
            let mut leaves: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = self
                .nodes
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, n)| holds(n) && !n.children.values().any(|&c| holds(&self.nodes[c])))
                .map(|(i, n)| std::cmp::Reverse((last_access(n, worker), i)))
                .collect();
            while self.tenant_tokens[worker] > self.config.max_tree_tokens {
                let Some(std::cmp::Reverse((_, leaf))) = leaves.pop() else {
                    break;
                };
                self.nodes[leaf].tenants.retain(|&(t, _)| t != worker);
                self.tenant_tokens[worker] -= self.nodes[leaf].label.len();
                let parent = self.nodes[leaf].parent;
                if self.nodes[leaf].tenants.is_empty() && self.nodes[leaf].children.is_empty() {
                    let first = self.nodes[leaf].label[0];
                    self.nodes[parent].children.remove(&first);
                    self.nodes[leaf].label = Vec::new();
                    self.free.push(leaf);
                }
                let parent_is_leaf = parent != 0
                    && holds(&self.nodes[parent])
                    && !self.nodes[parent]
                        .children
                        .values()
                        .any(|&c| holds(&self.nodes[c]));
                if parent_is_leaf {
                    let t = last_access(&self.nodes[parent], worker);
                    leaves.push(std::cmp::Reverse((t, parent)));
                }
            }
        }
    }

    /// Tokens of the tree `worker` holds.
    pub fn worker_tokens(&self, worker: usize) -> usize {
        self.tenant_tokens[worker]
    }
}

fn last_access(node: &Node, worker: usize) -> u64 {
    node.tenants
        .iter()
        .find(|&&(t, _)| t == worker)
        .map_or(0, |&(_, ts)| ts)
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The first index of the smallest value.
fn least(values: &[usize]) -> usize {
    values
        .iter()
        .enumerate()
        .min_by_key(|&(i, &v)| (v, i))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(prefix: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| prefix * 10_000 + i).collect()
    }

    #[test]
    fn a_match_above_the_threshold_goes_to_the_deepest_nodes_worker() {
        let mut r = SglangCacheAware::new(SglangConfig::default(), 3);
        let loads = [0, 0, 0];
        // Cold: the worker with the smallest tree share (all 0: the first).
        assert_eq!(r.route(0, &prompt(1, 100), &loads), 0);
        // Another prompt: worker 0 now owns 100 tokens, so the smallest is worker 1.
        assert_eq!(r.route(0, &prompt(2, 100), &loads), 1);
        // 100 of 120 tokens match worker 0's prompt: above 0.3.
        let mut p = prompt(1, 100);
        p.extend(prompt(9, 20));
        assert_eq!(r.route(0, &p, &loads), 0);
        // 20 of 100 match (below 0.3): the smallest share, worker 2.
        let mut q = prompt(2, 20);
        q.extend(prompt(8, 80));
        assert_eq!(r.route(0, &q, &loads), 2);
        assert_eq!(r.worker_tokens(0), 120);
    }

    #[test]
    fn imbalance_needs_both_the_absolute_and_the_relative_test() {
        let mut r = SglangCacheAware::new(SglangConfig::default(), 2);
        r.route(0, &prompt(1, 100), &[0, 0]);
        // Spread 65 > 64 and 100 > 35 × 1.5: imbalanced, least loaded wins over the match.
        assert_eq!(r.route(0, &prompt(1, 100), &[100, 35]), 1);
        // The prompt is now also under worker 1; the deepest node lists worker 0 first.
        assert_eq!(r.route(0, &prompt(1, 100), &[0, 0]), 0);
        // Spread 65 > 64 and 165 > 100 × 1.5: imbalanced.
        assert_eq!(r.route(0, &prompt(1, 100), &[165, 100]), 1);
        // Spread 64 is not above the absolute threshold: the cache decides.
        assert_eq!(r.route(0, &prompt(1, 100), &[164, 100]), 0);
        // Spread 90, but 300 ≤ 210 × 1.5: the relative test fails, the cache decides.
        assert_eq!(r.route(0, &prompt(1, 100), &[300, 210]), 0);
    }

    #[test]
    fn eviction_trims_each_worker_to_its_share_oldest_leaves_first() {
        let config = SglangConfig {
            max_tree_tokens: 150,
            eviction_interval_us: 10,
            ..SglangConfig::default()
        };
        let mut r = SglangCacheAware::new(config, 2);
        let mut a = prompt(1, 50);
        a.extend(prompt(2, 50));
        let mut b = prompt(1, 50);
        b.extend(prompt(3, 50));
        let mut c = prompt(1, 50);
        c.extend(prompt(4, 50));
        // All to worker 0 (matching the shared start above the threshold).
        for (t, p) in [(1, &a), (2, &b), (3, &c)] {
            assert_eq!(r.route(t, p, &[0, 0]), 0);
        }
        assert_eq!(r.worker_tokens(0), 200);
        // The next route runs eviction: the oldest leaf (a's tail) goes, 150 fit.
        r.route(10, &prompt(7, 1), &[0, 0]);
        assert_eq!(r.worker_tokens(0), 150);
        assert_eq!(r.prefix_match(&a), (50, Some(0)), "a's tail is gone");
        assert_eq!(r.prefix_match(&c).0, 100);
    }
}
