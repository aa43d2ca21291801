use proptest::prelude::*;

use super::*;

fn s(out: &mut Vec<u8>, text: &str) {
    assert!(text.len() < 32);
    out.push(0xa0 | text.len() as u8);
    out.extend_from_slice(text.as_bytes());
}

/// `[1.5, [["BlockStored", [1, 2], nil, [0..8], 4, nil, "GPU", nil]], 0]`, byte by byte
/// from vLLM's definitions (array-like batch, array-tagged event as before vLLM #42892).
fn array_batch() -> Vec<u8> {
    let mut b = vec![0x93, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x91, 0x98];
    s(&mut b, "BlockStored");
    b.extend([
        0x92, 0x01, 0x02, 0xc0, 0x98, 0, 1, 2, 3, 4, 5, 6, 7, 0x04, 0xc0,
    ]);
    s(&mut b, "GPU");
    b.extend([0xc0, 0x00]);
    b
}

#[test]
fn an_array_batch_written_by_hand_decodes() {
    let batch = decode_batch(&array_batch()).unwrap();
    assert_eq!(batch.ts, 1.5);
    assert_eq!(batch.data_parallel_rank, Some(0));
    assert_eq!(
        batch.events,
        [KvEvent::BlockStored(BlockStored {
            block_hashes: vec![1, 2],
            parent_block_hash: None,
            token_ids: (0..8).collect(),
            block_size: 4,
            lora_name: None,
            first_extra: FirstExtra::None,
            medium: Medium::Named("GPU".into()),
        })]
    );
}

/// A map batch with map-tagged events (vLLM after #42892), a 64-bit hash, a negative
/// (old Python-int) hash, a byte-string hash, keys vLLM added later, and an unknown event.
#[test]
fn a_map_batch_written_by_hand_decodes() {
    let mut b = vec![0x83];
    s(&mut b, "ts");
    b.extend([0xcb, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    s(&mut b, "events");
    b.push(0x94);
    // {"type": "BlockRemoved", "block_hashes": [u64 max, -2, bin32], "medium": "CPU",
    //  "group_idx": 0}
    b.push(0x84);
    s(&mut b, "type");
    s(&mut b, "BlockRemoved");
    s(&mut b, "block_hashes");
    b.extend([
        0x93, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    ]);
    b.extend([0xc4, 32]);
    b.extend((0..32u8).collect::<Vec<_>>());
    s(&mut b, "medium");
    s(&mut b, "CPU");
    s(&mut b, "group_idx");
    b.push(0x00);
    // {"type": "AllBlocksCleared"}
    b.push(0x81);
    s(&mut b, "type");
    s(&mut b, "AllBlocksCleared");
    // {"type": "SomethingNew", "x": [1, {"y": nil}]}: skipped, counted.
    b.push(0x82);
    s(&mut b, "type");
    s(&mut b, "SomethingNew");
    s(&mut b, "x");
    b.extend([0x92, 0x01, 0x81, 0xa1, b'y', 0xc0]);
    // A BlockRemoved of KV-cache group 1: skipped, counted.
    b.push(0x83);
    s(&mut b, "type");
    s(&mut b, "BlockRemoved");
    s(&mut b, "block_hashes");
    b.extend([0x91, 0x05]);
    s(&mut b, "group_idx");
    b.push(0x01);
    s(&mut b, "data_parallel_rank");
    b.push(0xc0);

    let batch = decode_batch(&b).unwrap();
    assert_eq!(batch.ts, 2.0);
    assert_eq!(batch.data_parallel_rank, None);
    assert_eq!(batch.skipped, 2);
    assert_eq!(
        batch.events,
        [
            KvEvent::BlockRemoved {
                block_hashes: vec![u64::MAX, (-2i64) as u64, 0x18191a1b1c1d1e1f],
                medium: Medium::Named("CPU".into()),
            },
            KvEvent::AllBlocksCleared,
        ]
    );
}

#[test]
fn a_two_element_batch_and_short_events_decode() {
    // [3, [["BlockRemoved", [7]], ["AllBlocksCleared"]]]: no rank, no medium (oldest form).
    let mut b = vec![0x92, 0x03, 0x92, 0x92];
    s(&mut b, "BlockRemoved");
    b.extend([0x91, 0x07, 0x91]);
    s(&mut b, "AllBlocksCleared");
    let batch = decode_batch(&b).unwrap();
    assert_eq!(batch.ts, 3.0);
    assert_eq!(
        batch.events,
        [
            KvEvent::BlockRemoved {
                block_hashes: vec![7],
                medium: Medium::Unspecified,
            },
            KvEvent::AllBlocksCleared,
        ]
    );
}

#[test]
fn malformed_payloads_are_errors_not_guesses() {
    let good = array_batch();
    // Every strict prefix is truncated.
    for cut in 0..good.len() {
        assert!(decode_batch(&good[..cut]).is_err(), "cut at {cut}");
    }
    let mut trailing = good.clone();
    trailing.push(0xc0);
    assert_eq!(
        decode_batch(&trailing),
        Err(DecodeError::Shape("bytes after the batch"))
    );
    // A BlockStored cut short after its hashes.
    let mut b = vec![0x92, 0x00, 0x91, 0x92];
    s(&mut b, "BlockStored");
    b.extend([0x91, 0x01]);
    assert_eq!(
        decode_batch(&b),
        Err(DecodeError::Shape("BlockStored without block_size"))
    );
    // A token id over 32 bits.
    let mut b = vec![0x92, 0x00, 0x91, 0x95];
    s(&mut b, "BlockStored");
    b.extend([0x91, 0x01, 0xc0, 0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0x01]);
    assert_eq!(
        decode_batch(&b),
        Err(DecodeError::Shape("token id over 32 bits"))
    );
    // An array claiming 2^32 - 1 elements in a few bytes: refused before allocating.
    let b = [0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x00];
    assert!(matches!(
        decode_batch(&b),
        Err(DecodeError::Msgpack(MsgpackError::Truncated(_)))
    ));
    // Not a batch at all.
    assert!(decode_batch(b"\xa3abc").is_err());
    assert!(decode_batch(&[]).is_err());
}

#[test]
fn sequence_frames() {
    assert_eq!(sequence(&[0, 0, 0, 0, 0, 0, 1, 2]), Ok(258));
    // vLLM's proposed 24-byte frame: sequence first, publisher id after.
    let mut long = 7u64.to_be_bytes().to_vec();
    long.extend([9; 16]);
    assert_eq!(sequence(&long), Ok(7));
    assert_eq!(sequence(&[1, 2, 3]), Err(DecodeError::Sequence(3)));
}

proptest! {
    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
    }

    /// Mutating one byte of a valid batch never panics either.
    #[test]
    fn mutated_batches_fail_cleanly(at in 0usize..40, value in any::<u8>()) {
        let mut b = array_batch();
        let i = at % b.len();
        b[i] = value;
        let _ = decode_batch(&b);
    }
}

/// `{"type": "BlockStored", …, "lora_name": lora, "extra_keys": extra}` with one block.
fn stored_with_extra(lora: Option<&str>, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![0x92, 0x00, 0x91, 0x88];
    s(&mut b, "type");
    s(&mut b, "BlockStored");
    s(&mut b, "block_hashes");
    b.extend([0x91, 0x01]);
    s(&mut b, "parent_block_hash");
    b.push(0xc0);
    s(&mut b, "token_ids");
    b.extend([0x92, 0x01, 0x02]);
    s(&mut b, "block_size");
    b.push(0x02);
    s(&mut b, "medium");
    s(&mut b, "GPU");
    s(&mut b, "lora_name");
    match lora {
        Some(l) => s(&mut b, l),
        None => b.push(0xc0),
    }
    s(&mut b, "extra_keys");
    b.extend_from_slice(extra);
    b
}

fn first_extra(lora: Option<&str>, extra: &[u8]) -> FirstExtra {
    let batch = decode_batch(&stored_with_extra(lora, extra)).unwrap();
    let [KvEvent::BlockStored(e)] = batch.events.as_slice() else {
        panic!("{batch:?}")
    };
    e.first_extra.clone()
}

#[test]
fn the_first_blocks_extra_keys_give_the_cache_salt() {
    // [["tenant-a"]]: a salt.
    let mut salt = vec![0x91, 0x91];
    s(&mut salt, "tenant-a");
    assert_eq!(
        first_extra(None, &salt),
        FirstExtra::Salt("tenant-a".into())
    );
    // [["sql", "tenant-a"]] under LoRA "sql": the salt after the adapter's name.
    let mut both = vec![0x91, 0x92];
    s(&mut both, "sql");
    s(&mut both, "tenant-a");
    assert_eq!(
        first_extra(Some("sql"), &both),
        FirstExtra::Salt("tenant-a".into())
    );
    // [["sql"]] under LoRA "sql", [nil], nil, []: nothing beyond the adapter.
    let mut lora_only = vec![0x91, 0x91];
    s(&mut lora_only, "sql");
    assert_eq!(first_extra(Some("sql"), &lora_only), FirstExtra::None);
    assert_eq!(first_extra(None, &[0x91, 0xc0]), FirstExtra::None);
    assert_eq!(first_extra(None, &[0xc0]), FirstExtra::None);
    assert_eq!(first_extra(None, &[0x90]), FirstExtra::None);
    // [[["mm-hash", 0]]] (a multimodal key), or two strings: keys kvroute cannot name.
    let mut mm = vec![0x91, 0x91, 0x92];
    s(&mut mm, "mm-hash");
    mm.push(0x00);
    assert_eq!(first_extra(None, &mm), FirstExtra::Unknown);
    let mut two = vec![0x91, 0x92];
    s(&mut two, "a");
    s(&mut two, "b");
    assert_eq!(first_extra(None, &two), FirstExtra::Unknown);
}

/// What vLLM's newest `kv_events.py` (commit 0181ea31, read for this test) writes: neither
/// `EventBatch` nor `KVCacheEvent` is `array_like`, so both are maps; `omit_defaults`
/// drops nil optional fields of `BlockStored` after `lora_name`, and the publisher fills in
/// `data_parallel_rank`.
#[test]
fn the_newest_vllm_encoding_decodes() {
    let mut b = vec![0x83];
    s(&mut b, "ts");
    b.extend([0xcb, 0x41, 0xd9, 0x5f, 0x5e, 0x10, 0x00, 0x00, 0x00]);
    s(&mut b, "events");
    b.extend([0x91, 0x88]);
    s(&mut b, "type");
    s(&mut b, "BlockStored");
    s(&mut b, "block_hashes");
    b.extend([0x91, 0xcf, 0xda, 0xb6, 0x20, 0x0f, 0x3d, 0xc2, 0x11, 0xc0]);
    s(&mut b, "parent_block_hash");
    b.push(0xc0);
    s(&mut b, "token_ids");
    b.extend([
        0x94, 0x01, 0xcd, 0x01, 0x00, 0xce, 0x00, 0x01, 0xf4, 0x00, 0x7f,
    ]);
    s(&mut b, "block_size");
    b.push(0x04);
    s(&mut b, "lora_id");
    b.push(0xc0);
    s(&mut b, "medium");
    s(&mut b, "GPU");
    // No default, so present even when nil.
    s(&mut b, "lora_name");
    b.push(0xc0);
    s(&mut b, "data_parallel_rank");
    b.push(0x02);
    let batch = decode_batch(&b).unwrap();
    assert_eq!(batch.data_parallel_rank, Some(2));
    assert!(batch.ts > 1.7e9);
    let [KvEvent::BlockStored(e)] = batch.events.as_slice() else {
        panic!("{batch:?}")
    };
    assert_eq!(e.block_hashes, [0xdab6_200f_3dc2_11c0]);
    assert_eq!(e.token_ids, [1, 256, 128_000, 127]);
    assert_eq!((e.block_size, e.lora_name.as_deref()), (4, None));
    assert_eq!(e.medium, Medium::Named("GPU".into()));
}
