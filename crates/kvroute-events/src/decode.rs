//! vLLM's `KVEventBatch` payloads, decoded in every shape releases have sent
//! (`vllm/distributed/kv_events.py`; `shared/reference/vllm-kv-events.md` §3): the batch as
//! an array `[ts, events, data_parallel_rank?]` or a map; each event as a tagged array
//! `["BlockStored", field, …]` (fields in declaration order, trailing defaults omitted) or
//! a tagged map `{"type": "BlockStored", name: value, …}` (unknown keys ignored); block
//! hashes as integers (any width or sign: their bits are the hash) or byte strings.

use crate::event::{BlockStored, FirstExtra, KvEvent, Medium};
use crate::msgpack::{Kind, MsgpackError, Reader};

/// One decoded batch.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    /// The engine's timestamp (seconds; not a reliable clock).
    pub ts: f64,
    /// The events kvroute indexes, in order.
    pub events: Vec<KvEvent>,
    /// The engine's data-parallel rank, when sent.
    pub data_parallel_rank: Option<u64>,
    /// Events left out: unknown tags, or KV-cache groups other than the first (hybrid
    /// models), which the prefix index does not model.
    pub skipped: usize,
}

/// Why a payload or message is not a vLLM event batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not msgpack, or not the types expected.
    #[error(transparent)]
    Msgpack(#[from] MsgpackError),
    /// msgpack of the wrong shape.
    #[error("malformed event batch: {0}")]
    Shape(&'static str),
    /// A ZMQ message without vLLM's three frames (topic, sequence, payload).
    #[error("expected 3 frames (topic, sequence, payload), got {0}")]
    Frames(usize),
    /// A sequence frame shorter than 8 bytes.
    #[error("sequence frame of {0} bytes, expected 8")]
    Sequence(usize),
    /// A batch that would decode into more entries (events, block hashes, token ids,
    /// extra keys) than the limit: refused before they are allocated.
    #[error("batch holds more than {0} entries")]
    TooLarge(usize),
}

/// Entries one batch may decode into unless told otherwise: 4 Mi (32 MiB of hashes at
/// most). A vLLM step stores and evicts at most its batched tokens' blocks (8,192 tokens
/// by default: 512 blocks of 16 and their token ids), so a real batch is thousands of
/// entries; only a broken or hostile publisher reaches millions.
pub const DEFAULT_MAX_BATCH_ENTRIES: usize = 4 << 20;

/// What is left of a batch's entry limit as it decodes. The frame limit bounds its bytes,
/// but a byte can announce a 4-byte token id or an 8-byte hash: this bounds what they
/// decode into.
struct Budget {
    left: usize,
    limit: usize,
}

impl Budget {
    fn take(&mut self, n: usize) -> Result<(), DecodeError> {
        self.left = self
            .left
            .checked_sub(n)
            .ok_or(DecodeError::TooLarge(self.limit))?;
        Ok(())
    }
}

/// Field names of each event, in declaration (= array) order after the tag.
const STORED_FIELDS: [&str; 11] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];
const REMOVED_FIELDS: [&str; 3] = ["block_hashes", "medium", "group_idx"];

/// The sequence number of a message's second frame: its first 8 bytes, big endian (a
/// longer frame, as with vLLM's proposed publisher id, keeps its sequence in front).
pub fn sequence(frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::Sequence(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes one `KVEventBatch` payload into at most `max_entries` entries (events, block
/// hashes, token ids and extra keys, counted together).
pub fn decode_batch(payload: &[u8], max_entries: usize) -> Result<EventBatch, DecodeError> {
    let mut r = Reader::new(payload);
    let b = &mut Budget {
        left: max_entries,
        limit: max_entries,
    };
    let mut batch = EventBatch {
        ts: 0.0,
        events: Vec::new(),
        data_parallel_rank: None,
        skipped: 0,
    };
    match r.peek()? {
        Kind::Array => {
            let n = r.array()?;
            if n < 2 {
                return Err(DecodeError::Shape("batch array shorter than [ts, events]"));
            }
            batch.ts = r.number()?;
            events(&mut r, &mut batch, b)?;
            if n >= 3 && !r.nil()? {
                batch.data_parallel_rank = Some(r.uint()?);
            }
            for _ in 3..n {
                r.skip()?;
            }
        }
        Kind::Map => {
            let mut seen_events = false;
            for _ in 0..r.map()? {
                match key(&mut r)? {
                    "ts" => batch.ts = r.number()?,
                    "events" => {
                        events(&mut r, &mut batch, b)?;
                        seen_events = true;
                    }
                    "data_parallel_rank" if !r.nil()? => {
                        batch.data_parallel_rank = Some(r.uint()?);
                    }
                    "data_parallel_rank" => {}
                    _ => r.skip()?,
                }
            }
            if !seen_events {
                return Err(DecodeError::Shape("batch map without events"));
            }
        }
        _ => return Err(DecodeError::Shape("batch is neither an array nor a map")),
    }
    if !r.is_at_end() {
        return Err(DecodeError::Shape("bytes after the batch"));
    }
    Ok(batch)
}

fn key<'a>(r: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    if r.peek()? != Kind::Str {
        return Err(DecodeError::Shape("map key is not a string"));
    }
    Ok(r.str()?)
}

fn events(r: &mut Reader<'_>, batch: &mut EventBatch, b: &mut Budget) -> Result<(), DecodeError> {
    let n = r.array()?;
    b.take(n)?;
    batch.events.reserve(n);
    for _ in 0..n {
        match event(r, b)? {
            Some(e) => batch.events.push(e),
            None => batch.skipped += 1,
        }
    }
    Ok(())
}

/// What an event's fields said, in either shape.
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<u64>>,
    parent: Option<Option<u64>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u64>,
    medium: Option<String>,
    lora_name: Option<String>,
    group_idx: Option<u64>,
    /// The strings of `extra_keys[0]`, or `None` if it held anything else.
    first_extra: Option<Option<Vec<String>>>,
}

impl Fields {
    fn read(&mut self, r: &mut Reader<'_>, name: &str, b: &mut Budget) -> Result<(), DecodeError> {
        match name {
            "block_hashes" => self.block_hashes = Some(hashes(r, b)?),
            "parent_block_hash" => {
                self.parent = Some(if r.nil()? { None } else { Some(hash(r)?) });
            }
            "token_ids" => {
                let n = r.array()?;
                b.take(n)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = u32::try_from(r.uint()?)
                        .map_err(|_| DecodeError::Shape("token id over 32 bits"))?;
                    ids.push(t);
                }
                self.token_ids = Some(ids);
            }
            "block_size" => self.block_size = Some(r.uint()?),
            "medium" => self.medium = opt_str(r)?,
            "lora_name" => self.lora_name = opt_str(r)?,
            "group_idx" => self.group_idx = if r.nil()? { None } else { Some(r.uint()?) },
            "extra_keys" => self.first_extra = first_extra_keys(r, b)?,
            _ => r.skip()?,
        }
        Ok(())
    }

    fn medium(&mut self) -> Medium {
        self.medium
            .take()
            .map_or(Medium::Unspecified, Medium::Named)
    }

    /// The event named `tag`, `None` for tags kvroute does not know or groups it does not
    /// index.
    fn into_event(mut self, tag: &str) -> Result<Option<KvEvent>, DecodeError> {
        if self.group_idx.is_some_and(|g| g != 0) {
            return Ok(None);
        }
        Ok(Some(match tag {
            "BlockStored" => {
                let block_size = self
                    .block_size
                    .ok_or(DecodeError::Shape("BlockStored without block_size"))?;
                KvEvent::BlockStored(BlockStored {
                    block_hashes: self
                        .block_hashes
                        .take()
                        .ok_or(DecodeError::Shape("BlockStored without block_hashes"))?,
                    parent_block_hash: self
                        .parent
                        .ok_or(DecodeError::Shape("BlockStored without parent_block_hash"))?,
                    token_ids: self
                        .token_ids
                        .take()
                        .ok_or(DecodeError::Shape("BlockStored without token_ids"))?,
                    block_size: usize::try_from(block_size)
                        .map_err(|_| DecodeError::Shape("block_size too large"))?,
                    first_extra: match (self.first_extra.take(), &self.lora_name) {
                        (None, _) => FirstExtra::None,
                        (Some(None), _) => FirstExtra::Unknown,
                        (Some(Some(keys)), lora) => {
                            // vLLM's order: the LoRA name, multimodal keys, then the salt.
                            let mut rest = keys.as_slice();
                            if let (Some(first), Some(lora)) = (rest.first(), lora)
                                && first == lora
                            {
                                rest = &rest[1..];
                            }
                            match rest {
                                [] => FirstExtra::None,
                                [salt] => FirstExtra::Salt(salt.clone()),
                                _ => FirstExtra::Unknown,
                            }
                        }
                    },
                    lora_name: self.lora_name.take(),
                    medium: self.medium(),
                })
            }
            "BlockRemoved" => KvEvent::BlockRemoved {
                block_hashes: self
                    .block_hashes
                    .take()
                    .ok_or(DecodeError::Shape("BlockRemoved without block_hashes"))?,
                medium: self.medium(),
            },
            "AllBlocksCleared" => KvEvent::AllBlocksCleared,
            _ => return Ok(None),
        }))
    }
}

fn event(r: &mut Reader<'_>, b: &mut Budget) -> Result<Option<KvEvent>, DecodeError> {
    let mut fields = Fields::default();
    match r.peek()? {
        Kind::Array => {
            let n = r.array()?;
            if n == 0 {
                return Err(DecodeError::Shape("empty event array"));
            }
            let tag = r.str()?;
            let names: &[&str] = match tag {
                "BlockStored" => &STORED_FIELDS,
                "BlockRemoved" => &REMOVED_FIELDS,
                _ => &[],
            };
            for i in 0..n - 1 {
                match names.get(i) {
                    Some(name) => fields.read(r, name, b)?,
                    None => r.skip()?,
                }
            }
            fields.into_event(tag)
        }
        Kind::Map => {
            let mut tag = None;
            for _ in 0..r.map()? {
                match key(r)? {
                    "type" => tag = Some(r.str()?),
                    name => fields.read(r, name, b)?,
                }
            }
            let tag = tag.ok_or(DecodeError::Shape("event map without type"))?;
            fields.into_event(tag)
        }
        _ => Err(DecodeError::Shape("event is neither an array nor a map")),
    }
}

/// `extra_keys`: one entry per block, each nil or an array of keys. Only the first block's
/// matter (`Some(Some(strings))`, or `Some(None)` when it holds anything but strings: keys
/// kvroute cannot reproduce); nil or an empty list is `None`.
fn first_extra_keys(
    r: &mut Reader<'_>,
    b: &mut Budget,
) -> Result<Option<Option<Vec<String>>>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    let n = r.array()?;
    if n == 0 {
        return Ok(None);
    }
    let first = if r.nil()? {
        None
    } else if r.peek()? == Kind::Array {
        let mut strings = Some(Vec::new());
        let keys = r.array()?;
        b.take(keys)?;
        for _ in 0..keys {
            if r.peek()? == Kind::Str {
                let key = r.str()?.to_owned();
                if let Some(v) = strings.as_mut() {
                    v.push(key);
                }
            } else {
                r.skip()?;
                strings = None;
            }
        }
        Some(strings)
    } else {
        r.skip()?;
        Some(None)
    };
    for _ in 1..n {
        r.skip()?;
    }
    Ok(first)
}

fn opt_str(r: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    Ok(if r.nil()? {
        None
    } else {
        Some(r.str()?.to_owned())
    })
}

/// A block hash: an integer's 64 bits, or a byte digest's last 8 bytes read big endian
/// (the value vLLM sends when it is told to send integers).
fn hash(r: &mut Reader<'_>) -> Result<u64, DecodeError> {
    match r.peek()? {
        Kind::Int => Ok(r.int_bits()?),
        Kind::Bin => {
            let b = r.bin()?;
            if b.is_empty() {
                return Err(DecodeError::Shape("empty block hash"));
            }
            let tail = &b[b.len().saturating_sub(8)..];
            Ok(tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
        }
        _ => Err(DecodeError::Shape(
            "block hash is neither an integer nor bytes",
        )),
    }
}

fn hashes(r: &mut Reader<'_>, b: &mut Budget) -> Result<Vec<u64>, DecodeError> {
    let n = r.array()?;
    b.take(n)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(hash(r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
