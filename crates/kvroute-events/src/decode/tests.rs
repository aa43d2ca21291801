use proptest::prelude::*;
use test_support::mutate::mutation;

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
    let batch = decode_batch(&array_batch(), DEFAULT_MAX_BATCH_ENTRIES).unwrap();
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

    let batch = decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES).unwrap();
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
    let batch = decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES).unwrap();
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
        assert!(
            decode_batch(&good[..cut], DEFAULT_MAX_BATCH_ENTRIES).is_err(),
            "cut at {cut}"
        );
    }
    let mut trailing = good.clone();
    trailing.push(0xc0);
    assert_eq!(
        decode_batch(&trailing, DEFAULT_MAX_BATCH_ENTRIES),
        Err(DecodeError::Shape("bytes after the batch"))
    );
    // A BlockStored cut short after its hashes.
    let mut b = vec![0x92, 0x00, 0x91, 0x92];
    s(&mut b, "BlockStored");
    b.extend([0x91, 0x01]);
    assert_eq!(
        decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES),
        Err(DecodeError::Shape("BlockStored without block_size"))
    );
    // A token id over 32 bits.
    let mut b = vec![0x92, 0x00, 0x91, 0x95];
    s(&mut b, "BlockStored");
    b.extend([0x91, 0x01, 0xc0, 0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0x01]);
    assert_eq!(
        decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES),
        Err(DecodeError::Shape("token id over 32 bits"))
    );
    // An array claiming 2^32 - 1 elements in a few bytes: refused before allocating.
    let b = [0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x00];
    assert!(matches!(
        decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES),
        Err(DecodeError::Msgpack(MsgpackError::Truncated(_)))
    ));
    // Not a batch at all.
    assert!(decode_batch(b"\xa3abc", DEFAULT_MAX_BATCH_ENTRIES).is_err());
    assert!(decode_batch(&[], DEFAULT_MAX_BATCH_ENTRIES).is_err());
}

#[test]
fn a_batch_decoding_into_more_entries_than_the_limit_is_refused() {
    // One event, two hashes and eight token ids: eleven entries.
    assert!(decode_batch(&array_batch(), 11).is_ok());
    assert_eq!(
        decode_batch(&array_batch(), 10),
        Err(DecodeError::TooLarge(10))
    );
    // A million one-byte hashes (1 MiB, under any frame limit) would take 8 MiB decoded:
    // refused at the array's header, before anything is reserved.
    let n: u32 = 1 << 20;
    let mut b = vec![0x92, 0x00, 0x91, 0x92];
    s(&mut b, "BlockRemoved");
    b.push(0xdd);
    b.extend(n.to_be_bytes());
    b.resize(b.len() + n as usize, 0x01);
    assert_eq!(
        decode_batch(&b, 1 << 16),
        Err(DecodeError::TooLarge(1 << 16))
    );
    assert_eq!(
        decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES).map(|b| b.events.len()),
        Ok(1)
    );
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
    /// A batch built from a generated model, in either batch shape, either event shape,
    /// narrow or wide msgpack encodings, with unknown events and fields mixed in, decodes
    /// to exactly the model's events; every strict prefix of it is an error.
    #[test]
    fn generated_batches_decode_to_the_model(batch in batch()) {
        let bytes = batch.encode();
        prop_assert_eq!(decode_batch(&bytes, DEFAULT_MAX_BATCH_ENTRIES), Ok(batch.expected()));
        for cut in 0..bytes.len() {
            prop_assert!(decode_batch(&bytes[..cut], DEFAULT_MAX_BATCH_ENTRIES).is_err(), "cut at {}", cut);
        }
    }

    /// The same batches with bytes flipped, inserted, deleted, cut off or copied elsewhere:
    /// a batch or an error, never a panic (nor an allocation the input cannot back).
    #[test]
    fn mutated_batches_fail_cleanly(
        batch in batch(),
        mutations in prop::collection::vec(mutation(MSGPACK_MARKERS), 1..4),
    ) {
        let mut bytes = batch.encode();
        for m in &mutations {
            m.apply(&mut bytes);
        }
        if let Ok(b) = decode_batch(&bytes, DEFAULT_MAX_BATCH_ENTRIES) {
            prop_assert!(b.events.len() + b.skipped <= bytes.len());
        }
        let _ = sequence(&bytes);
    }
}

/// A msgpack writer: minimal encodings, or (`wide`) the widest form of every integer,
/// length and string, which the format allows as well.
struct Writer {
    out: Vec<u8>,
    wide: bool,
}

impl Writer {
    fn nil(&mut self) {
        self.out.push(0xc0);
    }

    fn uint(&mut self, v: u64) {
        match v {
            _ if self.wide => {
                self.out.push(0xcf);
                self.out.extend(v.to_be_bytes());
            }
            0..0x80 => self.out.push(v as u8),
            0x80..0x100 => self.out.extend([0xcc, v as u8]),
            0x100..0x1_0000 => {
                self.out.push(0xcd);
                self.out.extend((v as u16).to_be_bytes());
            }
            0x1_0000..0x1_0000_0000 => {
                self.out.push(0xce);
                self.out.extend((v as u32).to_be_bytes());
            }
            _ => {
                self.out.push(0xcf);
                self.out.extend(v.to_be_bytes());
            }
        }
    }

    fn int(&mut self, v: i64) {
        if v >= 0 {
            return self.uint(v as u64);
        }
        match v {
            _ if self.wide => {
                self.out.push(0xd3);
                self.out.extend(v.to_be_bytes());
            }
            -32..0 => self.out.push(v as i8 as u8),
            -128..-32 => self.out.extend([0xd0, v as i8 as u8]),
            -32768..-128 => {
                self.out.push(0xd1);
                self.out.extend((v as i16).to_be_bytes());
            }
            -0x8000_0000..-32768 => {
                self.out.push(0xd2);
                self.out.extend((v as i32).to_be_bytes());
            }
            _ => {
                self.out.push(0xd3);
                self.out.extend(v.to_be_bytes());
            }
        }
    }

    fn len(&mut self, n: usize, fix: u8, fix_max: usize, m16: u8, m32: u8) {
        if n < fix_max && !self.wide {
            self.out.push(fix | n as u8);
        } else if n < 0x1_0000 && !self.wide {
            self.out.push(m16);
            self.out.extend((n as u16).to_be_bytes());
        } else {
            self.out.push(m32);
            self.out.extend((n as u32).to_be_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        if (32..256).contains(&s.len()) && !self.wide {
            self.out.extend([0xd9, s.len() as u8]);
        } else {
            self.len(s.len(), 0xa0, 32, 0xda, 0xdb);
        }
        self.out.extend(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        if self.wide {
            self.out.push(0xc6);
            self.out.extend((b.len() as u32).to_be_bytes());
        } else {
            self.out.extend([0xc4, b.len() as u8]);
        }
        self.out.extend(b);
    }

    fn array(&mut self, n: usize) {
        self.len(n, 0x90, 16, 0xdc, 0xdd);
    }

    fn map(&mut self, n: usize) {
        self.len(n, 0x80, 16, 0xde, 0xdf);
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.nil(),
        }
    }

    /// Something the decoder skips: nested arrays and maps of scalars.
    fn junk(&mut self, depth: u8) {
        match depth % 4 {
            0 => self.nil(),
            1 => self.str("x"),
            2 => {
                self.array(2);
                self.int(-7);
                self.out.extend([0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
            }
            _ => {
                self.map(1);
                self.str("y");
                self.array(1);
                self.out.push(0xc3);
            }
        }
    }
}

/// A block hash as vLLM may send it.
#[derive(Clone, Debug)]
enum Hash {
    /// An integer's 64 bits, written as unsigned.
    Unsigned(u64),
    /// A negative integer (an old Python `hash()`), written as signed.
    Signed(i64),
    /// A byte digest.
    Bytes(Vec<u8>),
}

impl Hash {
    fn bits(&self) -> u64 {
        match self {
            Self::Unsigned(v) => *v,
            Self::Signed(v) => *v as u64,
            Self::Bytes(b) => b[b.len().saturating_sub(8)..]
                .iter()
                .fold(0, |acc, &x| (acc << 8) | u64::from(x)),
        }
    }

    fn write(&self, w: &mut Writer) {
        match self {
            Self::Unsigned(v) => w.uint(*v),
            Self::Signed(v) => w.int(*v),
            Self::Bytes(b) => w.bin(b),
        }
    }
}

fn hash() -> impl Strategy<Value = Hash> {
    prop_oneof![
        any::<u64>().prop_map(Hash::Unsigned),
        (0..300u64).prop_map(Hash::Unsigned),
        (i64::MIN..0).prop_map(Hash::Signed),
        (-200..0i64).prop_map(Hash::Signed),
        prop::collection::vec(any::<u8>(), 1..33).prop_map(Hash::Bytes),
    ]
}

/// `extra_keys`, as sent.
#[derive(Clone, Debug)]
enum Extra {
    Absent,
    Nil,
    /// One entry per block: each nil, strings, or strings with a multimodal key among them.
    Blocks(Vec<Option<(Vec<String>, bool)>>),
}

impl Extra {
    fn write(&self, w: &mut Writer) {
        match self {
            Self::Absent | Self::Nil => w.nil(),
            Self::Blocks(blocks) => {
                w.array(blocks.len());
                for b in blocks {
                    match b {
                        None => w.nil(),
                        Some((keys, mm)) => {
                            w.array(keys.len() + usize::from(*mm));
                            for k in keys {
                                w.str(k);
                            }
                            if *mm {
                                w.array(2);
                                w.str("mm-hash");
                                w.uint(0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// What the first block's keys add beyond the LoRA name (vLLM's order: the adapter's
    /// name, multimodal keys, then the salt).
    fn first(&self, lora: Option<&str>) -> FirstExtra {
        let Self::Blocks(blocks) = self else {
            return FirstExtra::None;
        };
        match blocks.first() {
            None | Some(None) => FirstExtra::None,
            Some(Some((_, true))) => FirstExtra::Unknown,
            Some(Some((keys, false))) => {
                let rest = match (keys.first(), lora) {
                    (Some(k), Some(l)) if k == l => &keys[1..],
                    _ => &keys[..],
                };
                match rest {
                    [] => FirstExtra::None,
                    [salt] => FirstExtra::Salt(salt.clone()),
                    _ => FirstExtra::Unknown,
                }
            }
        }
    }
}

fn extra(lora: Option<String>) -> impl Strategy<Value = Extra> {
    let keys = prop_oneof![
        Just(vec![]),
        "[a-z-]{1,10}".prop_map(|s| vec![s]),
        prop::collection::vec("[a-z-]{1,10}", 0..3),
        // vLLM's first key under an adapter is its name.
        Just(lora.into_iter().collect::<Vec<_>>()),
    ];
    let first = (keys, any::<bool>()).prop_map(move |(mut k, salted)| {
        if salted {
            k.push("tenant-a".into());
        }
        k
    });
    let block = prop::option::of((first, prop::bool::weighted(0.1)));
    prop_oneof![
        Just(Extra::Absent),
        Just(Extra::Nil),
        prop::collection::vec(block, 0..3).prop_map(Extra::Blocks),
    ]
}

/// One generated event: what it says, and how it is written.
#[derive(Clone, Debug)]
enum Event {
    Stored {
        hashes: Vec<Hash>,
        parent: Option<Hash>,
        tokens: Vec<u32>,
        block_size: u64,
        lora: Option<String>,
        medium: Option<String>,
        extra: Extra,
        group: Option<u64>,
    },
    Removed {
        hashes: Vec<Hash>,
        medium: Option<String>,
        group: Option<u64>,
    },
    Cleared,
    /// An event kvroute does not know, with fields it skips.
    Unknown(String, u8),
}

fn medium() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("GPU".to_owned()),
        Just("CPU".to_owned()),
        "[A-Za-z_]{0,12}",
    ])
}

fn group() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![4 => Just(None), 4 => Just(Some(0)), 1 => (1..4u64).prop_map(Some)]
}

fn event() -> impl Strategy<Value = Event> {
    let stored = (
        prop::collection::vec(hash(), 0..4),
        prop::option::of(hash()),
        prop::collection::vec(prop_oneof![any::<u32>(), 0..200u32], 0..12),
        prop_oneof![Just(16u64), 1..64u64, any::<u64>()],
        prop::option::of("[a-z-]{1,8}"),
        medium(),
        group(),
    )
        .prop_flat_map(
            |(hashes, parent, tokens, block_size, lora, medium, group)| {
                extra(lora.clone()).prop_map(move |extra| Event::Stored {
                    hashes: hashes.clone(),
                    parent: parent.clone(),
                    tokens: tokens.clone(),
                    block_size,
                    lora: lora.clone(),
                    medium: medium.clone(),
                    extra,
                    group,
                })
            },
        );
    let removed = (prop::collection::vec(hash(), 0..4), medium(), group()).prop_map(
        |(hashes, medium, group)| Event::Removed {
            hashes,
            medium,
            group,
        },
    );
    let unknown = (
        prop::sample::select(vec!["SomethingNew", "BlockStoredV2", "", "blockstored"]),
        any::<u8>(),
    )
        .prop_map(|(t, j)| Event::Unknown(t.to_owned(), j));
    prop_oneof![4 => stored, 3 => removed, 1 => Just(Event::Cleared), 1 => unknown]
}

impl Event {
    /// The decoded event, `None` when it is skipped.
    fn expected(&self) -> Option<KvEvent> {
        match self {
            Self::Stored { group: Some(g), .. } | Self::Removed { group: Some(g), .. }
                if *g != 0 =>
            {
                None
            }
            Self::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora,
                medium,
                extra,
                ..
            } => Some(KvEvent::BlockStored(BlockStored {
                block_hashes: hashes.iter().map(Hash::bits).collect(),
                parent_block_hash: parent.as_ref().map(Hash::bits),
                token_ids: tokens.clone(),
                block_size: *block_size as usize,
                lora_name: lora.clone(),
                medium: medium.clone().map_or(Medium::Unspecified, Medium::Named),
                first_extra: extra.first(lora.as_deref()),
            })),
            Self::Removed { hashes, medium, .. } => Some(KvEvent::BlockRemoved {
                block_hashes: hashes.iter().map(Hash::bits).collect(),
                medium: medium.clone().map_or(Medium::Unspecified, Medium::Named),
            }),
            Self::Cleared => Some(KvEvent::AllBlocksCleared),
            Self::Unknown(..) => None,
        }
    }

    /// Writes the event as a tagged array (fields in declaration order, trailing defaults
    /// left out) or a tagged map (fields in `order`, defaults left out, unknown keys added).
    fn write(&self, w: &mut Writer, as_map: bool, order: &[usize]) {
        type Field<'e> = (&'static str, Box<dyn Fn(&mut Writer) + 'e>, bool);
        let (tag, fields): (&str, Vec<Field<'_>>) = match self {
            Self::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora,
                medium,
                extra,
                group,
            } => (
                "BlockStored",
                vec![
                    (
                        "block_hashes",
                        Box::new(move |w: &mut Writer| hashes_to(w, hashes)),
                        true,
                    ),
                    (
                        "parent_block_hash",
                        Box::new(move |w: &mut Writer| match parent {
                            Some(h) => h.write(w),
                            None => w.nil(),
                        }),
                        true,
                    ),
                    (
                        "token_ids",
                        Box::new(move |w: &mut Writer| {
                            w.array(tokens.len());
                            for t in tokens {
                                w.uint(u64::from(*t));
                            }
                        }),
                        true,
                    ),
                    (
                        "block_size",
                        Box::new(move |w: &mut Writer| w.uint(*block_size)),
                        true,
                    ),
                    ("lora_id", Box::new(|w: &mut Writer| w.nil()), false),
                    (
                        "medium",
                        Box::new(move |w: &mut Writer| w.opt_str(medium.as_deref())),
                        medium.is_some(),
                    ),
                    (
                        "lora_name",
                        Box::new(move |w: &mut Writer| w.opt_str(lora.as_deref())),
                        lora.is_some(),
                    ),
                    (
                        "extra_keys",
                        Box::new(move |w: &mut Writer| extra.write(w)),
                        !matches!(extra, Extra::Absent),
                    ),
                    (
                        "group_idx",
                        Box::new(move |w: &mut Writer| group_to(w, *group)),
                        group.is_some(),
                    ),
                    (
                        "kv_cache_spec_kind",
                        Box::new(|w: &mut Writer| w.str("full_attention")),
                        false,
                    ),
                    (
                        "kv_cache_spec_sliding_window",
                        Box::new(|w: &mut Writer| w.nil()),
                        false,
                    ),
                ],
            ),
            Self::Removed {
                hashes,
                medium,
                group,
            } => (
                "BlockRemoved",
                vec![
                    (
                        "block_hashes",
                        Box::new(move |w: &mut Writer| hashes_to(w, hashes)),
                        true,
                    ),
                    (
                        "medium",
                        Box::new(move |w: &mut Writer| w.opt_str(medium.as_deref())),
                        medium.is_some(),
                    ),
                    (
                        "group_idx",
                        Box::new(move |w: &mut Writer| group_to(w, *group)),
                        group.is_some(),
                    ),
                ],
            ),
            Self::Cleared => ("AllBlocksCleared", vec![]),
            Self::Unknown(tag, junk) => {
                let j = *junk;
                (
                    tag.as_str(),
                    vec![
                        (
                            "x",
                            Box::new(move |w: &mut Writer| w.junk(j)) as Box<dyn Fn(&mut Writer)>,
                            true,
                        ),
                        (
                            "y",
                            Box::new(move |w: &mut Writer| w.junk(j / 4)),
                            j % 2 == 0,
                        ),
                    ],
                )
            }
        };
        if as_map {
            // Defaults left out, fields in the order `order` gives, the tag anywhere among
            // them, and now and then a key vLLM may add later.
            let keep: Vec<&Field<'_>> = fields.iter().filter(|f| f.2).collect();
            let mut idx: Vec<usize> = Vec::new();
            for &i in order {
                if i < keep.len() && !idx.contains(&i) {
                    idx.push(i);
                }
            }
            let rest: Vec<usize> = (0..keep.len()).filter(|i| !idx.contains(i)).collect();
            idx.extend(rest);
            let tag_at = order.first().map_or(0, |&i| i % (idx.len() + 1));
            let novel = order.get(1).is_some_and(|&i| i % 3 == 0);
            w.map(idx.len() + 1 + usize::from(novel));
            for (n, &i) in idx.iter().enumerate() {
                if n == tag_at {
                    w.str("type");
                    w.str(tag);
                }
                w.str(keep[i].0);
                (keep[i].1)(w);
            }
            if tag_at == idx.len() {
                w.str("type");
                w.str(tag);
            }
            if novel {
                w.str("publisher_id");
                w.junk(3);
            }
        } else {
            let n = fields.iter().rposition(|f| f.2).map_or(0, |i| i + 1);
            w.array(n + 1);
            w.str(tag);
            for f in &fields[..n] {
                (f.1)(w);
            }
        }
    }
}

fn hashes_to(w: &mut Writer, hashes: &[Hash]) {
    w.array(hashes.len());
    for h in hashes {
        h.write(w);
    }
}

fn group_to(w: &mut Writer, group: Option<u64>) {
    match group {
        Some(g) => w.uint(g),
        None => w.nil(),
    }
}

/// A batch's timestamp, as msgspec may write a float (or an integer, by hand).
#[derive(Clone, Copy, Debug)]
enum Ts {
    F64(f64),
    F32(f32),
    Int(i32),
}

/// One generated batch and how it is written.
#[derive(Clone, Debug)]
struct Batch {
    ts: Ts,
    events: Vec<(Event, bool, Vec<usize>)>,
    /// `None`: not sent; `Some(None)`: nil.
    rank: Option<Option<u64>>,
    as_map: bool,
    wide: bool,
    /// Array batch: elements after the rank; map batch: unknown keys.
    trailing: u8,
}

fn batch() -> impl Strategy<Value = Batch> {
    let ts = prop_oneof![
        (0.0..2e9f64).prop_map(Ts::F64),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |v| !v.is_nan())
            .prop_map(Ts::F64),
        any::<f32>()
            .prop_filter("NaN is not equal to itself", |v| !v.is_nan())
            .prop_map(Ts::F32),
        any::<i32>().prop_map(Ts::Int),
    ];
    let event = (
        event(),
        any::<bool>(),
        prop::collection::vec(0..12usize, 0..12),
    );
    (
        ts,
        prop::collection::vec(event, 0..5),
        prop::option::of(prop::option::of(prop_oneof![0..8u64, any::<u64>()])),
        any::<bool>(),
        prop::bool::weighted(0.2),
        0..3u8,
    )
        .prop_map(|(ts, events, rank, as_map, wide, trailing)| Batch {
            ts,
            events,
            rank,
            as_map,
            wide,
            trailing,
        })
}

impl Batch {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer {
            out: Vec::new(),
            wide: self.wide,
        };
        let ts = |w: &mut Writer| match self.ts {
            Ts::F64(v) => {
                w.out.push(0xcb);
                w.out.extend(v.to_bits().to_be_bytes());
            }
            Ts::F32(v) => {
                w.out.push(0xca);
                w.out.extend(v.to_bits().to_be_bytes());
            }
            Ts::Int(v) => w.int(i64::from(v)),
        };
        let events = |w: &mut Writer| {
            w.array(self.events.len());
            for (e, as_map, order) in &self.events {
                e.write(w, *as_map, order);
            }
        };
        let rank = |w: &mut Writer| match self.rank {
            Some(Some(r)) => w.uint(r),
            _ => w.nil(),
        };
        let trailing = usize::from(self.trailing);
        if self.as_map {
            w.map(2 + usize::from(self.rank.is_some()) + trailing);
            for i in 0..trailing {
                w.str(["extra", "publisher"][i % 2]);
                w.junk(i as u8 + 1);
            }
            if self.rank.is_some() {
                w.str("data_parallel_rank");
                rank(&mut w);
            }
            w.str("events");
            events(&mut w);
            w.str("ts");
            ts(&mut w);
        } else {
            // A rank left out is only possible when nothing follows it.
            let n = if self.rank.is_none() && trailing == 0 {
                2
            } else {
                3 + trailing
            };
            w.array(n);
            ts(&mut w);
            events(&mut w);
            if n > 2 {
                rank(&mut w);
            }
            for i in 0..trailing {
                w.junk(i as u8);
            }
        }
        w.out
    }

    fn expected(&self) -> EventBatch {
        let decoded: Vec<Option<KvEvent>> =
            self.events.iter().map(|(e, ..)| e.expected()).collect();
        EventBatch {
            ts: match self.ts {
                Ts::F64(v) => v,
                Ts::F32(v) => f64::from(v),
                Ts::Int(v) => f64::from(v),
            },
            skipped: decoded.iter().filter(|e| e.is_none()).count(),
            events: decoded.into_iter().flatten().collect(),
            data_parallel_rank: self.rank.flatten(),
        }
    }
}

/// msgpack markers a mutation may insert out of place (`test_support::mutate`): lengths
/// the input cannot hold, reserved and extension types.
const MSGPACK_MARKERS: &[&[u8]] = &[
    &[0xc0],
    &[0xdd, 0xff, 0xff, 0xff, 0xff],
    &[0xdf, 0x7f, 0xff, 0xff, 0xff],
    &[0xdb, 0xff, 0xff, 0xff, 0xf0],
    &[0xc6, 0xff, 0xff, 0xff, 0xff],
    &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0],
    &[0x9f],
    &[0x8f],
    &[0xc1],
    &[0xd4, 0x01, 0x02],
    &[0xa4, 0xff, 0xfe, 0xfd, 0xfc],
];

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
    let batch = decode_batch(&stored_with_extra(lora, extra), DEFAULT_MAX_BATCH_ENTRIES).unwrap();
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
    let batch = decode_batch(&b, DEFAULT_MAX_BATCH_ENTRIES).unwrap();
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
