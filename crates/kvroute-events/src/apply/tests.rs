use proptest::prelude::*;

use super::*;
use crate::event::{FirstExtra, Medium};

const BS: usize = 4;

fn ep(name: &str) -> EndpointId {
    EndpointId::new(name)
}

/// Engine hashes are opaque to kvroute: any distinct numbers do.
fn stored(engine: &[u64], parent: Option<u64>, tokens: &[u32], medium: &str) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: engine.to_vec(),
        parent_block_hash: parent,
        token_ids: tokens.to_vec(),
        block_size: BS,
        lora_name: None,
        first_extra: FirstExtra::None,
        medium: Medium::Named(medium.into()),
    })
}

fn removed(engine: &[u64], medium: &str) -> KvEvent {
    KvEvent::BlockRemoved {
        block_hashes: engine.to_vec(),
        medium: Medium::Named(medium.into()),
    }
}

fn ours(tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    BlockHasher::new(BS).hash_tokens(tokens, &ExtraKeys::default(), &mut out);
    out
}

/// Blocks of `tokens` that `endpoint` holds as a prefix, per tier.
fn held(index: &Shared<PrefixIndex>, endpoint: &str, tokens: &[u32]) -> [u32; 3] {
    index
        .read()
        .match_prefix(&ours(tokens))
        .into_iter()
        .find(|m| m.endpoint == ep(endpoint))
        .map_or([0; 3], |m| m.per_tier)
}

#[test]
fn a_stored_chain_matches_the_prompt_that_made_it() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..12).collect();
    let done = a.apply(
        &index,
        &ep("a"),
        &[
            stored(&[900, 901], None, &tokens[..8], "GPU"),
            stored(&[902], Some(901), &tokens[8..], "GPU"),
        ],
    );
    assert_eq!(done.stored, 3);
    assert_eq!(held(&index, "a", &tokens), [3, 0, 0]);
    // A longer prompt with the same start matches three blocks; another does not match.
    let mut longer = tokens.clone();
    longer.extend([50, 51, 52, 53]);
    assert_eq!(held(&index, "a", &longer), [3, 0, 0]);
    assert_eq!(held(&index, "b", &tokens), [0, 0, 0]);
    assert_eq!(held(&index, "a", &[7, 7, 7, 7]), [0, 0, 0]);
    assert_eq!(a.known_blocks(&ep("a")), 3);
}

#[test]
fn removal_by_engine_hash_and_tiers() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..8).collect();
    a.apply(
        &index,
        &ep("a"),
        &[
            stored(&[1, 2], None, &tokens, "GPU"),
            stored(&[1, 2], None, &tokens, "CPU"),
        ],
    );
    assert_eq!(
        held(&index, "a", &tokens),
        [2, 0, 0],
        "GPU is the best tier"
    );
    let done = a.apply(&index, &ep("a"), &[removed(&[2], "GPU")]);
    assert_eq!(done.removed, 1);
    assert_eq!(
        held(&index, "a", &tokens),
        [1, 1, 0],
        "block 2 is left on CPU"
    );
    let done = a.apply(&index, &ep("a"), &[removed(&[2, 77], "CPU")]);
    assert_eq!((done.removed, done.unknown_removed), (1, 1));
    assert_eq!(held(&index, "a", &tokens), [1, 0, 0]);
    assert_eq!(a.known_blocks(&ep("a")), 1);
    // Removing from a tier the block is not in changes nothing.
    let done = a.apply(&index, &ep("a"), &[removed(&[1], "CPU")]);
    assert_eq!((done.removed, done.unknown_removed), (1, 0));
    let done = a.apply(&index, &ep("a"), &[removed(&[1], "CPU")]);
    assert_eq!((done.removed, done.unknown_removed), (0, 1));
    assert_eq!(held(&index, "a", &tokens), [1, 0, 0]);
}

#[test]
fn an_unknown_parent_orphans_the_blocks_and_their_children() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..8).collect();
    let done = a.apply(
        &index,
        &ep("a"),
        &[
            stored(&[11], Some(10), &tokens[..4], "GPU"),
            stored(&[12], Some(11), &tokens[4..], "GPU"),
        ],
    );
    assert_eq!((done.stored, done.orphaned), (0, 2));
    assert_eq!(index.read().entries(), 0);
}

#[test]
fn malformed_events_are_rejected_whole() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let mut wrong_size = stored(&[1], None, &[1, 2, 3, 4, 5, 6, 7, 8], "GPU");
    if let KvEvent::BlockStored(s) = &mut wrong_size {
        s.block_size = 8;
    }
    let done = a.apply(
        &index,
        &ep("a"),
        &[stored(&[1, 2], None, &[1, 2, 3, 4, 5], "GPU"), wrong_size],
    );
    assert_eq!((done.rejected, done.stored), (2, 0));
    assert_eq!(index.read().entries(), 0);
}

#[test]
fn cleared_and_forgotten_endpoints_hold_nothing() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..8).collect();
    for e in ["a", "b"] {
        a.apply(&index, &ep(e), &[stored(&[1, 2], None, &tokens, "GPU")]);
    }
    let done = a.apply(&index, &ep("a"), &[KvEvent::AllBlocksCleared]);
    assert_eq!(done.cleared, 1);
    assert_eq!(held(&index, "a", &tokens), [0, 0, 0]);
    assert_eq!(held(&index, "b", &tokens), [2, 0, 0]);
    // After a clear, the old engine hashes are unknown: a child of one is an orphan.
    let done = a.apply(&index, &ep("a"), &[stored(&[3], Some(2), &[9; 4], "GPU")]);
    assert_eq!(done.orphaned, 1);
    assert_eq!(a.clear(&index, &ep("b")), 2);
    a.remove_endpoint(&index, &ep("b"));
    assert_eq!(index.read().entries(), 0);
}

#[test]
fn lora_blocks_chain_from_their_own_root() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..4).collect();
    let mut lora = stored(&[5], None, &tokens, "GPU");
    if let KvEvent::BlockStored(s) = &mut lora {
        s.lora_name = Some("sql-adapter".into());
    }
    a.apply(&index, &ep("a"), &[lora]);
    assert_eq!(held(&index, "a", &tokens), [0, 0, 0], "base-model prompt");
    let mut out = Vec::new();
    let extra = ExtraKeys {
        lora: Some("sql-adapter"),
        cache_salt: None,
    };
    BlockHasher::new(BS).hash_tokens(&tokens, &extra, &mut out);
    assert_eq!(index.read().match_prefix(&out).len(), 1);
}

#[test]
fn a_reused_engine_hash_replaces_the_old_content() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    a.apply(
        &index,
        &ep("a"),
        &[stored(&[1], None, &[1, 2, 3, 4], "GPU")],
    );
    a.apply(
        &index,
        &ep("a"),
        &[stored(&[1], None, &[5, 6, 7, 8], "GPU")],
    );
    assert_eq!(held(&index, "a", &[1, 2, 3, 4]), [0, 0, 0]);
    assert_eq!(held(&index, "a", &[5, 6, 7, 8]), [1, 0, 0]);
    assert_eq!(index.read().entries(), 1);
}

proptest! {
    /// A model engine caches random prompts (chains of blocks drawn from a small alphabet,
    /// so chains share prefixes) and evicts random blocks leaf-first, as vLLM does; after its
    /// events are applied, the index holds exactly the engine's blocks.
    #[test]
    fn the_index_mirrors_the_engine(
        ops in prop::collection::vec((prop::collection::vec(0u32..3, 1..5), any::<bool>()), 1..40)
    ) {
        let index = Shared::new(PrefixIndex::new());
        let mut a = Applier::new(BS);
        let e = ep("pod");
        // Engine state: engine hash → (parent engine hash, tokens); engine hashes are made
        // up by the engine (its own numbering of prefixes).
        let mut engine: HashMap<Vec<u32>, u64> = HashMap::new();
        let mut next = 1000u64;
        for (prompt, evict) in ops {
            let tokens: Vec<u32> = prompt.iter().flat_map(|&b| [b; BS]).collect();
            if evict {
                // Evict the deepest cached block of this prompt's chain, if any.
                let deepest = (1..=prompt.len()).rev().find_map(|n| {
                    let key = tokens[..n * BS].to_vec();
                    engine.get(&key).map(|&h| (key, h))
                });
                let leaf = deepest.filter(|(key, _)| {
                    !engine.keys().any(|k| k.len() > key.len() && k.starts_with(key))
                });
                if let Some((key, h)) = leaf {
                    engine.remove(&key);
                    a.apply(&index, &e, &[removed(&[h], "GPU")]);
                }
                continue;
            }
            let cached = (1..=prompt.len())
                .take_while(|&n| engine.contains_key(&tokens[..n * BS]))
                .count();
            let parent = (cached > 0).then(|| engine[&tokens[..cached * BS]]);
            let mut new = Vec::new();
            for n in cached + 1..=prompt.len() {
                next += 1;
                engine.insert(tokens[..n * BS].to_vec(), next);
                new.push(next);
            }
            if !new.is_empty() {
                let done = a.apply(
                    &index,
                    &e,
                    &[stored(&new, parent, &tokens[cached * BS..], "GPU")],
                );
                prop_assert_eq!(done.orphaned + done.rejected, 0);
            }
        }
        prop_assert_eq!(index.read().entries(), engine.len());
        prop_assert_eq!(a.known_blocks(&e), engine.len());
        for key in engine.keys() {
            let blocks = key.len() / BS;
            prop_assert_eq!(held(&index, "pod", key), [blocks as u32, 0, 0]);
        }
    }
}

#[test]
fn salted_chains_match_salted_requests_and_unknown_keys_match_nothing() {
    let index = Shared::new(PrefixIndex::new());
    let mut a = Applier::new(BS);
    let tokens: Vec<u32> = (0..4).collect();
    let with = |first_extra: FirstExtra, h: u64| {
        KvEvent::BlockStored(BlockStored {
            block_hashes: vec![h],
            parent_block_hash: None,
            token_ids: tokens.clone(),
            block_size: BS,
            lora_name: None,
            medium: Medium::Named("GPU".into()),
            first_extra,
        })
    };
    a.apply(
        &index,
        &ep("salted"),
        &[with(FirstExtra::Salt("t1".into()), 1)],
    );
    a.apply(&index, &ep("odd"), &[with(FirstExtra::Unknown, 2)]);
    let salted = |salt: Option<&str>| {
        let mut out = Vec::new();
        let extra = ExtraKeys {
            lora: None,
            cache_salt: salt,
        };
        BlockHasher::new(BS).hash_tokens(&tokens, &extra, &mut out);
        index.read().match_prefix(&out)
    };
    let m = salted(Some("t1"));
    assert_eq!((m.len(), &m[0].endpoint), (1, &ep("salted")));
    assert!(salted(Some("t2")).is_empty());
    assert!(
        salted(None).is_empty(),
        "the unknown keys' blocks match nothing"
    );
    // They are still known, so their removal is applied.
    let done = a.apply(&index, &ep("odd"), &[removed(&[2], "GPU")]);
    assert_eq!(done.removed, 1);
    assert_eq!(index.read().entries(), 1);
}
