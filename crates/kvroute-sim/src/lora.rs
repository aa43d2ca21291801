//! LoRA adapter slots, as vLLM's LoRA model manager keeps them: at most `max_loras`
//! adapters on the GPU, the least recently used one replaced when a step's batch needs
//! another, each load costing time.

use std::sync::Arc;

/// The adapters held on the GPU, least recently used first.
#[derive(Debug, Default)]
pub(crate) struct LoraSlots {
    capacity: usize,
    held: Vec<Arc<str>>,
    loads: u64,
}

impl LoraSlots {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Whether a batch that already uses `batch` adapters can take a request for `lora`.
    pub(crate) fn admits(&self, batch: &[Arc<str>], lora: Option<&Arc<str>>) -> bool {
        match lora {
            None => true,
            Some(a) => batch.contains(a) || batch.len() < self.capacity,
        }
    }

    /// Makes every adapter of `batch` (at most the capacity) held, most recently used, and
    /// returns how many had to be loaded. Adapters outside the batch make room, least
    /// recently used first.
    pub(crate) fn hold(&mut self, batch: &[Arc<str>]) -> usize {
        let mut loaded = 0;
        for a in batch {
            if let Some(at) = self.held.iter().position(|h| h == a) {
                let a = self.held.remove(at);
                self.held.push(a);
                continue;
            }
            if self.held.len() >= self.capacity
                && let Some(at) = self.held.iter().position(|h| !batch.contains(h))
            {
                self.held.remove(at);
            }
            self.held.push(Arc::clone(a));
            loaded += 1;
        }
        self.loads += loaded as u64;
        loaded
    }

    /// Adapters loaded since the engine started.
    pub(crate) fn loads(&self) -> u64 {
        self.loads
    }

    /// The adapters held, least recently used first.
    #[cfg(test)]
    pub(crate) fn held(&self) -> &[Arc<str>] {
        &self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<Arc<str>> {
        v.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn a_full_batch_admits_only_its_adapters_and_the_least_recent_leaves() {
        let mut slots = LoraSlots::new(2);
        let a = Arc::<str>::from("a");
        let c = Arc::<str>::from("c");
        assert!(slots.admits(&[], Some(&a)));
        assert!(slots.admits(&names(&["x", "y"]), None), "the base model");
        assert!(!slots.admits(&names(&["x", "y"]), Some(&a)));
        assert!(slots.admits(&names(&["x", "a"]), Some(&a)));
        assert_eq!(slots.hold(&names(&["a", "b"])), 2);
        assert_eq!(slots.hold(&names(&["b"])), 0, "held: no load");
        // `a` is now the least recently used: `c` replaces it.
        assert_eq!(slots.hold(&names(&["c"])), 1);
        assert_eq!(slots.held(), &names(&["b", "c"])[..]);
        assert!(slots.held().contains(&c));
        assert_eq!(slots.loads(), 3);
        let mut none = LoraSlots::new(0);
        assert!(!none.admits(&[], Some(&a)));
        assert_eq!(none.hold(&[]), 0);
    }
}
