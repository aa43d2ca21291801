use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

fn ep(n: u32) -> EndpointId {
    EndpointId::new(format!("ep-{n}"))
}

fn hs(ids: &[u64]) -> Vec<BlockHash> {
    ids.iter().map(|&i| BlockHash(i)).collect()
}

fn matches(idx: &PrefixIndex, blocks: &[u64]) -> BTreeMap<String, (u32, [u32; 3])> {
    idx.match_prefix(&hs(blocks))
        .into_iter()
        .map(|m| (m.endpoint.to_string(), (m.blocks, m.per_tier)))
        .collect()
}

#[test]
fn longest_consecutive_prefix_per_endpoint() {
    let mut idx = PrefixIndex::new();
    idx.store(&ep(1), &hs(&[1, 2, 3, 4]), Tier::Gpu);
    idx.store(&ep(2), &hs(&[1, 2]), Tier::Gpu);
    idx.store(&ep(3), &hs(&[2, 3, 4]), Tier::Gpu);
    let m = matches(&idx, &[1, 2, 3, 9]);
    assert_eq!(m.len(), 2, "ep-3 lacks the first block: no match at all");
    assert_eq!(m["ep-1"].0, 3);
    assert_eq!(m["ep-2"].0, 2);
    assert!(matches(&idx, &[]).is_empty());
    assert!(matches(&idx, &[7]).is_empty());
    assert_eq!(idx.blocks(), 4);
    assert_eq!(idx.entries(), 9);
}

/// A run held from any point on, not only from the first block: ep-3 holds 2, 3, 4.
#[test]
fn a_held_run_starts_where_it_is_asked_to() {
    let mut idx = PrefixIndex::new();
    idx.store(&ep(3), &hs(&[2, 3, 4]), Tier::Gpu);
    idx.store(&ep(1), &hs(&[5]), Tier::Cpu);
    assert_eq!(idx.held_run(&ep(3), &hs(&[2, 3, 9, 4])), 2);
    assert_eq!(idx.held_run(&ep(3), &hs(&[1, 2, 3])), 0);
    assert_eq!(idx.held_run(&ep(3), &[]), 0);
    assert_eq!(idx.held_run(&ep(1), &hs(&[5, 2])), 1, "any tier");
    assert_eq!(idx.held_run(&ep(2), &hs(&[2])), 0, "an endpoint never seen");
}

#[test]
fn tiers_are_counted_by_the_best_copy() {
    let mut idx = PrefixIndex::new();
    idx.store(&ep(1), &hs(&[1, 2, 3]), Tier::Cpu);
    idx.store(&ep(1), &hs(&[1]), Tier::Gpu);
    idx.store(&ep(1), &hs(&[3]), Tier::Disk);
    let m = matches(&idx, &[1, 2, 3]);
    assert_eq!(m["ep-1"], (3, [1, 2, 0]));
    assert_eq!(idx.tiers(&ep(1), BlockHash(1)), vec![Tier::Gpu, Tier::Cpu]);
    assert_eq!(idx.entries(), 3, "a second tier is not a second entry");
    assert_eq!(
        idx.remove(&ep(1), &hs(&[1]), Some(Tier::Gpu)),
        0,
        "still in CPU"
    );
    assert_eq!(matches(&idx, &[1, 2, 3])["ep-1"], (3, [0, 3, 0]));
    assert_eq!(idx.remove(&ep(1), &hs(&[1]), Some(Tier::Cpu)), 1);
    assert!(matches(&idx, &[1, 2, 3]).is_empty());
}

#[test]
fn odd_cases() {
    let mut idx = PrefixIndex::new();
    // A store whose parent is unknown: kept, matched only through a held prefix.
    idx.store(&ep(1), &hs(&[20, 21]), Tier::Gpu);
    assert!(matches(&idx, &[10, 20, 21]).is_empty());
    assert_eq!(matches(&idx, &[20, 21])["ep-1"].0, 2);
    // Duplicate stores change nothing.
    idx.store(&ep(1), &hs(&[20, 21]), Tier::Gpu);
    assert_eq!(idx.entries(), 2);
    // Removing unknown blocks, or for an unknown endpoint, changes nothing.
    assert_eq!(idx.remove(&ep(1), &hs(&[99]), None), 0);
    assert_eq!(idx.remove(&ep(7), &hs(&[20]), None), 0);
    assert_eq!(idx.clear(&ep(7)), 0);
    assert_eq!(idx.remove_endpoint(&ep(7)), 0);
    // An endpoint that evicted a parent but kept a child matches up to the gap only.
    idx.store(&ep(2), &hs(&[1, 2, 3]), Tier::Gpu);
    idx.remove(&ep(2), &hs(&[2]), None);
    assert_eq!(matches(&idx, &[1, 2, 3])["ep-2"].0, 1);
    assert_eq!(idx.endpoint_blocks(&ep(2)), 2);
}

#[test]
fn clearing_and_removing_endpoints() {
    let mut idx = PrefixIndex::new();
    idx.store(&ep(1), &hs(&[1, 2, 3]), Tier::Gpu);
    idx.store(&ep(2), &hs(&[1, 2]), Tier::Gpu);
    assert_eq!(idx.clear(&ep(1)), 3);
    assert_eq!(idx.blocks(), 2, "block 3 had no other holder");
    assert_eq!(matches(&idx, &[1, 2, 3]).len(), 1);
    idx.store(&ep(1), &hs(&[1]), Tier::Gpu);
    assert_eq!(idx.remove_endpoint(&ep(1)), 1);
    assert_eq!(idx.endpoints().count(), 1);
    idx.store(&ep(3), &hs(&[1]), Tier::Gpu);
    let m = matches(&idx, &[1]);
    assert_eq!(
        m.keys().collect::<Vec<_>>(),
        ["ep-2", "ep-3"],
        "freed slot reused cleanly"
    );
    assert_eq!(idx.entries(), 3);
}

#[test]
fn many_holders_per_block() {
    let mut idx = PrefixIndex::new();
    for e in (0..50).rev() {
        idx.store(&ep(e), &hs(&[1, 2]), Tier::Gpu);
        if e.is_multiple_of(2) {
            idx.store(&ep(e), &hs(&[3]), Tier::Gpu);
        }
    }
    let m = matches(&idx, &[1, 2, 3]);
    assert_eq!(m.len(), 50);
    assert!(m.iter().all(|(k, v)| {
        let n: u32 = k[3..].parse().unwrap();
        v.0 == if n.is_multiple_of(2) { 3 } else { 2 }
    }));
}

#[test]
fn dropping_a_deep_chain_does_not_recurse() {
    let mut idx = PrefixIndex::new();
    let chain: Vec<u64> = (1..=1_000_000).collect();
    idx.store(&ep(1), &hs(&chain), Tier::Gpu);
    assert_eq!(matches(&idx, &chain[..512])["ep-1"].0, 512);
    drop(idx);
    let mut idx = PrefixIndex::new();
    idx.store(&ep(1), &hs(&chain), Tier::Gpu);
    assert_eq!(idx.remove_endpoint(&ep(1)), 1_000_000);
    assert_eq!(idx.blocks(), 0);
}

/// What the index must behave like: per endpoint, a map from block to tier mask.
#[derive(Default)]
struct Model(HashMap<u32, HashMap<u64, u8>>);

impl Model {
    fn matches(&self, blocks: &[u64]) -> BTreeMap<String, (u32, [u32; 3])> {
        let mut out = BTreeMap::new();
        for (e, held) in &self.0 {
            let mut per = [0u32; 3];
            let mut n = 0;
            for b in blocks {
                match held.get(b) {
                    Some(&mask) if mask != 0 => {
                        per[mask.trailing_zeros() as usize] += 1;
                        n += 1;
                    }
                    _ => break,
                }
            }
            if n > 0 {
                out.insert(ep(*e).to_string(), (n, per));
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Store(u32, Vec<u64>, usize),
    Remove(u32, Vec<u64>, Option<usize>),
    Clear(u32),
    Drop(u32),
    Match(Vec<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    let blocks = || proptest::collection::vec(0u64..24, 0..10);
    prop_oneof![
        4 => (0u32..5, blocks(), 0usize..3).prop_map(|(e, b, t)| Op::Store(e, b, t)),
        2 => (0u32..5, blocks(), proptest::option::of(0usize..3)).prop_map(|(e, b, t)| Op::Remove(e, b, t)),
        1 => (0u32..5).prop_map(Op::Clear),
        1 => (0u32..5).prop_map(Op::Drop),
        3 => blocks().prop_map(Op::Match),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn behaves_like_a_map_of_sets(ops in proptest::collection::vec(op(), 1..80), lean in any::<bool>()) {
        // With or without per-endpoint sets, the same behaviour.
        let mut idx = if lean { PrefixIndex::without_endpoint_sets() } else { PrefixIndex::new() };
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Store(e, b, t) => {
                    idx.store(&ep(e), &hs(&b), Tier::ALL[t]);
                    let held = model.0.entry(e).or_default();
                    for x in b {
                        *held.entry(x).or_default() |= Tier::ALL[t].bit();
                    }
                }
                Op::Remove(e, b, t) => {
                    let mut gone = 0;
                    if let Some(held) = model.0.get_mut(&e) {
                        let mask = t.map_or(u8::MAX, |t| Tier::ALL[t].bit());
                        for x in &b {
                            if let Some(m) = held.get_mut(x) {
                                *m &= !mask;
                                if *m == 0 {
                                    held.remove(x);
                                    gone += 1;
                                }
                            }
                        }
                    }
                    prop_assert_eq!(idx.remove(&ep(e), &hs(&b), t.map(|t| Tier::ALL[t])), gone);
                }
                Op::Clear(e) => {
                    let n = model.0.get_mut(&e).map_or(0, |h| std::mem::take(h).len());
                    prop_assert_eq!(idx.clear(&ep(e)), n);
                }
                Op::Drop(e) => {
                    let n = model.0.remove(&e).map_or(0, |h| h.len());
                    prop_assert_eq!(idx.remove_endpoint(&ep(e)), n);
                }
                Op::Match(b) => prop_assert_eq!(matches(&idx, &b), model.matches(&b)),
            }
            let entries: usize = model.0.values().map(HashMap::len).sum();
            prop_assert_eq!(idx.entries(), entries);
            for e in 0u32..5 {
                prop_assert_eq!(idx.endpoint_blocks(&ep(e)), model.0.get(&e).map_or(0, HashMap::len));
            }
            let distinct: std::collections::HashSet<u64> =
                model.0.values().flat_map(|h| h.keys().copied()).collect();
            prop_assert_eq!(idx.blocks(), distinct.len());
        }
    }
}
