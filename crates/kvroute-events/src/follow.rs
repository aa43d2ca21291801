use std::collections::HashMap;

use kvroute_core::EndpointId;
use kvroute_index::{PrefixIndex, Shared};

use crate::apply::{Applied, Applier};
use xxhash_rust::xxh3::xxh3_64;

use crate::decode::{DEFAULT_MAX_BATCH_ENTRIES, DecodeError, EventBatch, decode_batch};

/// Where a live message's sequence number puts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The next one expected: apply it.
    InOrder,
    /// Already applied from a replay: skip it.
    Duplicate,
    /// Lower than expected and not a replay's duplicate: the publisher restarted (its
    /// sequence starts again at 0 with each process), so what is known of it is stale.
    Restart,
    /// Messages from the given sequence number on were missed: replay them.
    Gap(u64),
}

/// How a catch-up replay went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// It continued the stream kvroute knew (the last batch applied came back identical)
    /// or started a stream of which nothing was known: in sequence now.
    Synced,
    /// It could not be joined to what kvroute knew (the publisher restarted, its buffer
    /// no longer reaches back, or it holds a hole): what was known is forgotten (this many
    /// blocks), and the stream followed from what the replay had.
    Resynced(usize),
    /// The replay was empty and nothing is known yet: wait for live messages.
    Empty,
}

/// One endpoint's event stream, in sequence: which message comes next, what a replay
/// covered, and the applier that keeps the endpoint's part of the index. Synchronous; the
/// subscriber task drives it with what its sockets receive.
#[derive(Debug)]
pub struct Follower {
    endpoint: EndpointId,
    applier: Applier,
    /// The next sequence number expected.
    expected: u64,
    /// The last batch applied: its sequence number and a fingerprint of its payload, to
    /// tell a replay from the same publisher from one by a restarted process.
    last: Option<(u64, u64)>,
    /// Fingerprints of the batches a replay applied: their live copies, queued meanwhile,
    /// arrive again and must match to be skipped as duplicates (a lower number with other
    /// content is a restarted publisher). Emptied once live traffic catches up.
    replayed: HashMap<u64, u64>,
    /// Entries one batch may decode into ([`decode_batch`]).
    max_entries: usize,
}

impl Follower {
    /// A follower of `endpoint`'s stream, for engines caching `block_size`-token blocks.
    pub fn new(endpoint: EndpointId, block_size: usize) -> Self {
        Self {
            endpoint,
            applier: Applier::new(block_size),
            expected: 0,
            last: None,
            replayed: HashMap::new(),
            max_entries: DEFAULT_MAX_BATCH_ENTRIES,
        }
    }

    /// The same follower, refusing batches that decode into more than `max_entries`
    /// entries (`--kv-events-max-batch-entries`).
    pub fn with_max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The endpoint followed.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// The next sequence number expected.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Where a catch-up replay should start: at the last batch applied (so that it can be
    /// recognised), or at the next expected when nothing is known.
    pub fn resume_from(&self) -> u64 {
        self.last.map_or(self.expected, |(seq, _)| seq)
    }

    /// Where a live message numbered `seq` carrying `payload` stands.
    pub fn order(&self, seq: u64, payload: &[u8]) -> Order {
        if seq == self.expected {
            Order::InOrder
        } else if seq > self.expected {
            Order::Gap(self.expected)
        } else if self.replayed.get(&seq) == Some(&xxh3_64(payload)) {
            Order::Duplicate
        } else {
            Order::Restart
        }
    }

    /// Applies live message `seq` (which [`Follower::order`] found in order). A payload
    /// that does not decode is skipped (the sequence moves on) and its error returned for
    /// counting; one over the entry limit also forgets what is known of the endpoint
    /// (the blocks it stored or evicted are unknown, so the entries kept could be stale),
    /// as a gap without replay does.
    pub fn apply(
        &mut self,
        index: &Shared<PrefixIndex>,
        seq: u64,
        payload: &[u8],
    ) -> Result<(Applied, usize), DecodeError> {
        // Live traffic has caught up with any replay: no more duplicates to expect.
        self.replayed.clear();
        self.apply_one(index, seq, payload)
    }

    fn apply_one(
        &mut self,
        index: &Shared<PrefixIndex>,
        seq: u64,
        payload: &[u8],
    ) -> Result<(Applied, usize), DecodeError> {
        self.expected = seq.wrapping_add(1);
        self.last = Some((seq, xxh3_64(payload)));
        let EventBatch {
            events, skipped, ..
        } = match decode_batch(payload, self.max_entries) {
            Ok(batch) => batch,
            Err(e @ DecodeError::TooLarge(_)) => {
                self.applier.clear(index, &self.endpoint);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        Ok((self.applier.apply(index, &self.endpoint, &events), skipped))
    }

    /// Applies a replay asked from [`Follower::resume_from`]: `(seq, payload)` in the order
    /// received, each batch's result going to `count`.
    pub fn catch_up(
        &mut self,
        index: &Shared<PrefixIndex>,
        batches: &[(u64, Vec<u8>)],
        mut count: impl FnMut(Result<(Applied, usize), DecodeError>),
    ) -> CatchUp {
        let mut rest = batches;
        let mut outcome = CatchUp::Synced;
        match (self.last, batches.first()) {
            (None, None) => return CatchUp::Empty,
            (None, Some(&(first, _))) => self.expected = first,
            (Some(last), Some((seq, payload))) if (*seq, xxh3_64(payload)) == last => {
                rest = &batches[1..];
            }
            (Some(_), first) => {
                let from = first.map_or(0, |&(seq, _)| seq);
                outcome = CatchUp::Resynced(self.resync_at(index, from));
            }
        }
        for (seq, payload) in rest {
            if *seq != self.expected {
                // A batch the publisher never buffered: what follows cannot be joined.
                let forgotten = self.resync_at(index, *seq);
                outcome = CatchUp::Resynced(match outcome {
                    CatchUp::Resynced(n) => n + forgotten,
                    _ => forgotten,
                });
            }
            count(self.apply_one(index, *seq, payload));
            if let Some(last) = self.last {
                self.replayed.insert(last.0, last.1);
            }
        }
        outcome
    }

    /// Gives up on what is known of the endpoint (a restart, or a gap no replay can fill)
    /// and follows the stream from `seq` on. Returns the blocks forgotten.
    pub fn resync_at(&mut self, index: &Shared<PrefixIndex>, seq: u64) -> usize {
        let forgotten = self.applier.clear(index, &self.endpoint);
        self.expected = seq;
        self.last = None;
        self.replayed.clear();
        forgotten
    }

    /// The endpoint left: forget it altogether.
    pub fn remove(&mut self, index: &Shared<PrefixIndex>) {
        self.applier.remove_endpoint(index, &self.endpoint);
    }
}

#[cfg(test)]
mod tests;
