use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

/// Most blocks a writer should apply per write hold. Measured (`docs/index.md`, "Sharing"):
/// at 1M block events/s, with spinning readers, holds of 64 blocks kept the p99 of a
/// 512-block match within 2x of idle in three runs of three; 256 in none.
pub const WRITE_BATCH_BLOCKS: usize = 64;

/// Attempts a reader makes before it sleeps: ~20 µs of spinning, several write holds.
const READ_SPINS: usize = 2_000;

/// An index shared between request handlers (readers) and the writers that apply events or
/// routing records. A reader-writer lock was chosen by measurement (`docs/index.md`,
/// "Sharing"): writers hold it for at most [`WRITE_BATCH_BLOCKS`] blocks at a time, so a
/// reader waits at most one short batch. A panic while holding it leaves a usable index
/// (every operation keeps the index's invariants between blocks), so poisoning is ignored.
#[derive(Debug, Default)]
pub struct Shared<T> {
    inner: RwLock<T>,
}

impl<T> Shared<T> {
    /// Shares `value`.
    pub fn new(value: T) -> Self {
        Self {
            inner: RwLock::new(value),
        }
    }

    /// Read access; many readers at once. A reader that finds a writer in spins for a
    /// while before sleeping: write holds are a few microseconds, and being put to sleep and
    /// woken by the kernel can cost more than that (`docs/index.md`, "Sharing").
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        for _ in 0..READ_SPINS {
            match self.inner.try_read() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Write access; keep the batch short, readers wait for it.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvroute_core::{BlockHash, EndpointId};

    use super::*;
    use crate::{PrefixIndex, Tier};

    /// Readers running against a writer that stores and removes chains always see a
    /// consistent prefix: an endpoint's match never exceeds what any state held.
    #[test]
    fn readers_see_consistent_states_under_writes() {
        let shared = Arc::new(Shared::new(PrefixIndex::new()));
        let chain: Vec<BlockHash> = (1..=64).map(BlockHash).collect();
        let writer = {
            let shared = Arc::clone(&shared);
            let chain = chain.clone();
            std::thread::spawn(move || {
                for round in 0..2000u64 {
                    let e = EndpointId::new(format!("ep-{}", round % 4));
                    let n = (round % 64) as usize + 1;
                    shared.write().store(&e, &chain[..n], Tier::Gpu);
                    shared.write().remove(&e, &chain[n / 2..n], None);
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let shared = Arc::clone(&shared);
                let chain = chain.clone();
                std::thread::spawn(move || {
                    let mut seen = 0;
                    for _ in 0..2000 {
                        for m in shared.read().match_prefix(&chain) {
                            assert!(m.blocks >= 1 && m.blocks <= 64);
                            seen += 1;
                        }
                    }
                    seen
                })
            })
            .collect();
        writer.join().unwrap();
        for r in readers {
            r.join().unwrap();
        }
        let idx = shared.read();
        for e in 0..4 {
            let m = idx.match_prefix(&chain);
            assert!(m.iter().all(|m| m.blocks <= 32), "ep-{e}: {m:?}");
        }
    }
}
