//! KV events in vLLM's wire format, written here from vLLM's definitions
//! (`vllm/distributed/kv_events.py`), not with the router's decoder, so one misreading of
//! the format cannot hide in both.
//!
//! A message is three ZMQ frames: the topic, the batch's sequence number (8 bytes, big
//! endian) and the msgpack payload of a `KVEventBatch`. The batch is positional:
//! `[ts, events, data_parallel_rank]` (msgspec `array_like`, as captured from vLLM
//! 0.26). Events are msgspec tagged unions: since vLLM PR #42892 each is a map
//! `{"type": "BlockStored", field: value, ...}` with fields in declaration order and
//! defaulted trailing fields omitted; before it, an array `["BlockStored", value, ...]`.

use rmp::encode;

use crate::engine::KvEvent;

/// How events inside a batch are encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventEncoding {
    /// Tagged maps (vLLM after PR #42892, June 2026).
    #[default]
    Map,
    /// Tagged arrays (vLLM before it).
    Array,
}

/// Encodes one `KVEventBatch`.
pub fn encode_batch(ts: f64, events: &[KvEvent], dp_rank: u32, encoding: EventEncoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + events.len() * 64);
    // Writing to a Vec cannot fail; the results are discarded knowingly.
    let _ = encode::write_array_len(&mut out, 3);
    let _ = encode::write_f64(&mut out, ts);
    let _ = encode::write_array_len(&mut out, events.len() as u32);
    for e in events {
        encode_event(&mut out, e, encoding);
    }
    let _ = encode::write_uint(&mut out, u64::from(dp_rank));
    out
}

fn encode_event(out: &mut Vec<u8>, e: &KvEvent, encoding: EventEncoding) {
    let map = encoding == EventEncoding::Map;
    match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            medium,
        } => {
            // BlockStored: block_hashes, parent_block_hash, token_ids, block_size, lora_id,
            // medium, lora_name (no defaults: always present); later fields default to None
            // and are omitted.
            header(out, map, "BlockStored", 7);
            field(out, map, "block_hashes");
            uints(out, block_hashes);
            field(out, map, "parent_block_hash");
            match parent_block_hash {
                Some(h) => {
                    let _ = encode::write_uint(out, *h);
                }
                None => {
                    let _ = encode::write_nil(out);
                }
            }
            field(out, map, "token_ids");
            let _ = encode::write_array_len(out, token_ids.len() as u32);
            for t in token_ids {
                let _ = encode::write_uint(out, u64::from(*t));
            }
            field(out, map, "block_size");
            let _ = encode::write_uint(out, *block_size as u64);
            field(out, map, "lora_id");
            let _ = encode::write_nil(out);
            field(out, map, "medium");
            let _ = encode::write_str(out, medium.as_str());
            field(out, map, "lora_name");
            match lora_name {
                Some(name) => {
                    let _ = encode::write_str(out, name);
                }
                None => {
                    let _ = encode::write_nil(out);
                }
            }
        }
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
        } => {
            header(out, map, "BlockRemoved", 2);
            field(out, map, "block_hashes");
            uints(out, block_hashes);
            field(out, map, "medium");
            let _ = encode::write_str(out, medium.as_str());
        }
        KvEvent::AllBlocksCleared => header(out, map, "AllBlocksCleared", 0),
    }
}

/// The tag and the container for `fields` fields.
fn header(out: &mut Vec<u8>, map: bool, tag: &str, fields: u32) {
    if map {
        let _ = encode::write_map_len(out, fields + 1);
        let _ = encode::write_str(out, "type");
    } else {
        let _ = encode::write_array_len(out, fields + 1);
    }
    let _ = encode::write_str(out, tag);
}

fn field(out: &mut Vec<u8>, map: bool, name: &str) {
    if map {
        let _ = encode::write_str(out, name);
    }
}

fn uints(out: &mut Vec<u8>, values: &[u64]) {
    let _ = encode::write_array_len(out, values.len() as u32);
    for v in values {
        let _ = encode::write_uint(out, *v);
    }
}

/// The sequence-number frame: 8 bytes, big endian.
pub fn seq_frame(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The replay stream's end marker: sequence -1, sent with an empty payload.
pub const END_SEQ: [u8; 8] = [0xff; 8];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Medium;

    /// `[1.5, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}], 0]`, byte by
    /// byte from msgpack's spec and vLLM's struct definitions.
    #[test]
    fn block_removed_map_bytes() {
        let got = encode_batch(
            1.5,
            &[KvEvent::BlockRemoved {
                block_hashes: vec![1],
                medium: Medium::Gpu,
            }],
            0,
            EventEncoding::Map,
        );
        let mut want = vec![0x93, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x91, 0x83];
        want.extend_from_slice(b"\xa4type\xacBlockRemoved");
        want.extend_from_slice(b"\xacblock_hashes\x91\x01");
        want.extend_from_slice(b"\xa6medium\xa3GPU");
        want.push(0x00);
        assert_eq!(got, want);
    }

    /// A stored block with a 64-bit hash above 2^63 (uint64, 0xcf), a nil parent, and the
    /// array encoding of older vLLM releases.
    #[test]
    fn block_stored_array_bytes() {
        let got = encode_batch(
            0.0,
            &[KvEvent::BlockStored {
                block_hashes: vec![0xdead_beef_0000_0001],
                parent_block_hash: None,
                token_ids: vec![1, 300],
                block_size: 2,
                lora_name: None,
                medium: Medium::Gpu,
            }],
            3,
            EventEncoding::Array,
        );
        let mut want = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x91, 0x98];
        want.extend_from_slice(b"\xabBlockStored");
        want.extend_from_slice(&[0x91, 0xcf, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]);
        want.push(0xc0); // parent: nil
        want.extend_from_slice(&[0x92, 0x01, 0xcd, 0x01, 0x2c]); // [1, 300]
        want.push(0x02); // block_size
        want.push(0xc0); // lora_id
        want.extend_from_slice(b"\xa3GPU");
        want.push(0xc0); // lora_name
        want.push(0x03); // data_parallel_rank
        assert_eq!(got, want);
    }

    #[test]
    fn all_blocks_cleared_and_frames() {
        let got = encode_batch(0.0, &[KvEvent::AllBlocksCleared], 0, EventEncoding::Map);
        assert_eq!(&got[10..], b"\x91\x81\xa4type\xb0AllBlocksCleared\x00");
        let got = encode_batch(0.0, &[KvEvent::AllBlocksCleared], 0, EventEncoding::Array);
        assert_eq!(&got[10..], b"\x91\x91\xb0AllBlocksCleared\x00");
        assert_eq!(seq_frame(258), [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(END_SEQ, (-1i64).to_be_bytes());
    }

    /// A block offloaded to host memory by an adapter's request: `medium` `"CPU"` and the
    /// adapter's name, as vLLM's offloading connector and LoRA report them.
    #[test]
    fn a_cpu_block_of_an_adapter_carries_both() {
        let got = encode_batch(
            0.0,
            &[
                KvEvent::BlockStored {
                    block_hashes: vec![7],
                    parent_block_hash: Some(6),
                    token_ids: vec![1],
                    block_size: 1,
                    lora_name: Some("sql".into()),
                    medium: Medium::Cpu,
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![5],
                    medium: Medium::Cpu,
                },
            ],
            0,
            EventEncoding::Array,
        );
        let mut want = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x92, 0x98];
        want.extend_from_slice(b"\xabBlockStored");
        want.extend_from_slice(&[0x91, 0x07, 0x06, 0x91, 0x01, 0x01, 0xc0]);
        want.extend_from_slice(b"\xa3CPU\xa3sql");
        want.extend_from_slice(b"\x93\xacBlockRemoved\x91\x05\xa3CPU");
        want.push(0x00);
        assert_eq!(got, want);
    }
}
