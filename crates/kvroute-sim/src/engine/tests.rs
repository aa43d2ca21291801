use std::sync::Arc;

use super::*;

fn req(id: RequestId, tokens: &[u32], max_tokens: usize) -> SimRequest {
    SimRequest {
        id,
        prompt: PromptTokens::Explicit(Arc::from(tokens)),
        max_tokens,
        lora: None,
    }
}

fn seq(start: u32, n: u32) -> Vec<u32> {
    (start..start + n).collect()
}

fn run_to_end(e: &mut Engine) -> Vec<StepReport> {
    let mut out = Vec::new();
    while e.has_work() {
        out.push(e.step());
        assert!(out.len() < 10_000, "no progress");
    }
    out
}

#[test]
fn prefill_then_decode_timed_by_the_profile() {
    // Blocks of 4; base 100 µs, 10 µs per decoding sequence, 1 µs per prefill token.
    let mut e = Engine::new(Profile::tiny(100, 8, 64), true);
    assert!(e.add(req(1, &seq(0, 10), 3)));
    let steps = run_to_end(&mut e);
    let durations: Vec<u64> = steps.iter().map(|s| s.duration_us).collect();
    assert_eq!(
        durations,
        [110, 110, 110],
        "10-token prefill, then two decodes"
    );
    assert_eq!(steps[0].first_tokens, [1]);
    assert_eq!(steps[2].finished[0].output_tokens, 3);
    match &steps[0].events[..] {
        [
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash: None,
                token_ids,
                block_size: 4,
                lora_name: None,
                medium: Medium::Gpu,
            },
        ] => {
            assert_eq!(block_hashes.len(), 2, "only the 2 full prompt blocks");
            assert_eq!(token_ids, &seq(0, 8));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.cached_hashes().len(), 2);
    assert_eq!(e.kv_usage(), 0.0, "finished: nothing in use, content kept");
}

#[test]
fn chunked_prefill_spreads_a_long_prompt_over_steps() {
    let mut e = Engine::new(Profile::tiny(100, 8, 8), true);
    assert!(e.add(req(1, &seq(0, 20), 1)));
    let steps = run_to_end(&mut e);
    let prefill: Vec<usize> = steps.iter().map(|s| s.prefill_tokens).collect();
    assert_eq!(prefill, [8, 8, 4]);
    assert_eq!(
        steps.iter().map(|s| s.duration_us).collect::<Vec<_>>(),
        [108, 108, 104]
    );
    assert!(steps[1].first_tokens.is_empty());
    assert_eq!(
        steps[2].first_tokens,
        [1],
        "first token once the whole prompt is in"
    );
    let stored: Vec<usize> = steps
        .iter()
        .flat_map(|s| &s.events)
        .map(|ev| match ev {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes.len(),
            _ => 0,
        })
        .collect();
    assert_eq!(
        stored,
        [2, 2, 1],
        "each step announces the blocks it filled"
    );
}

/// With the context cost on, a prefilled token costs in proportion to what it attends to
/// (every token up to itself, cached ones too) and a decode to its context: here 1 µs a pair
/// and 1 µs a context token, on top of the linear 100 µs + 10 µs a decode + 1 µs a token.
#[test]
fn attention_costs_grow_with_the_context() {
    let profile = Profile {
        context: crate::profile::ContextCost {
            prefill_us_per_ktoken: 1000.0,
            decode_us_per_ktoken: 1000.0,
        },
        ..Profile::tiny(100, 8, 8)
    };
    let mut e = Engine::new(profile.clone().with_context_cost(), true);
    assert!(e.add(req(1, &seq(0, 20), 2)));
    let durations: Vec<u64> = run_to_end(&mut e).iter().map(|s| s.duration_us).collect();
    // Chunks of 8, 8 and 4 tokens attend to 1+…+8, 9+…+16 and 17+…+20 tokens; the decode
    // reads 20.
    assert_eq!(durations, [108 + 36, 108 + 100, 104 + 74, 110 + 20]);
    // A turn over a cached history pays attention to it: 4 new tokens after 12 cached.
    let mut b = seq(0, 12);
    b.extend(seq(100, 4));
    assert!(e.add(req(2, &b, 1)));
    let steps = run_to_end(&mut e);
    assert_eq!(steps[0].prefill_tokens, 4);
    assert_eq!(steps[0].duration_us, 104 + (13 + 14 + 15 + 16));
    // Off (the default), the same figures cost nothing.
    let mut off = Engine::new(profile, true);
    assert!(off.add(req(1, &seq(0, 20), 2)));
    let durations: Vec<u64> = run_to_end(&mut off).iter().map(|s| s.duration_us).collect();
    assert_eq!(durations, [108, 108, 104, 110]);
}

#[test]
fn a_shared_prefix_is_served_from_the_cache() {
    let mut e = Engine::new(Profile::tiny(100, 8, 64), true);
    assert!(e.add(req(1, &seq(0, 16), 1)));
    run_to_end(&mut e);
    let mut b = seq(0, 12);
    b.extend(seq(100, 4));
    assert!(e.add(req(2, &b, 1)));
    let steps = run_to_end(&mut e);
    assert_eq!(steps[0].prefill_tokens, 4, "12 of 16 tokens were cached");
    assert_eq!(steps[0].finished[0].cached_tokens, 12);
    match &steps[0].events[..] {
        [
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash: Some(_),
                ..
            },
        ] => {
            assert_eq!(block_hashes.len(), 1)
        }
        other => panic!("{other:?}"),
    }
    // A fully cached prompt recomputes its last block (vLLM caps a hit at all but the
    // last token, in whole blocks).
    assert!(e.add(req(3, &seq(0, 16), 1)));
    let steps = run_to_end(&mut e);
    assert_eq!(steps[0].prefill_tokens, 4);
    assert_eq!(steps[0].finished[0].cached_tokens, 12);
    assert!(steps[0].events.is_empty(), "its content is cached already");
    assert_eq!(e.prefix_cache_counts(), (48, 24));
}

#[test]
fn eviction_takes_unused_blocks_then_the_oldest_tails() {
    // 4 blocks of 4 tokens.
    let mut e = Engine::new(Profile::tiny(4, 8, 64), true);
    assert!(e.add(req(1, &seq(0, 8), 1))); // blocks a0 a1, both cached
    let first = run_to_end(&mut e);
    let KvEvent::BlockStored {
        block_hashes: a, ..
    } = &first[0].events[0]
    else {
        panic!()
    };
    let a = a.clone();
    assert!(e.add(req(2, &seq(50, 8), 1))); // takes the two never-used blocks
    let s = run_to_end(&mut e);
    assert!(
        s.iter()
            .flat_map(|s| &s.events)
            .all(|ev| !matches!(ev, KvEvent::BlockRemoved { .. }))
    );
    assert!(e.add(req(3, &seq(90, 4), 1))); // one block: the oldest freed tail, a1
    let s = run_to_end(&mut e);
    assert_eq!(
        s[0].events[0],
        KvEvent::BlockRemoved {
            block_hashes: vec![a[1]],
            medium: Medium::Gpu,
        },
        "the tail of the oldest sequence goes first"
    );
    assert!(e.cached_hashes().contains(&a[0]));
}

#[test]
fn requests_queue_when_the_batch_is_full() {
    let mut e = Engine::new(Profile::tiny(100, 1, 64), false);
    assert!(e.add(req(1, &seq(0, 4), 2)));
    assert!(e.add(req(2, &seq(10, 4), 1)));
    let s1 = e.step();
    assert_eq!((e.running(), e.waiting()), (1, 1));
    assert!(s1.events.is_empty(), "events off");
    let s2 = e.step();
    assert_eq!(s2.finished[0].id, 1);
    let s3 = e.step();
    assert_eq!(s3.first_tokens, [2]);
    assert!(!e.has_work());
}

#[test]
fn a_sequence_short_of_blocks_preempts_the_newest() {
    // 3 blocks. Two 4-token prompts fill 2 blocks; their decodes need 2 more: one must go.
    let mut e = Engine::new(Profile::tiny(3, 8, 64), false);
    assert!(e.add(req(1, &seq(0, 4), 3)));
    assert!(e.add(req(2, &seq(10, 4), 3)));
    let s1 = e.step();
    assert_eq!(s1.first_tokens, [1, 2]);
    let s2 = e.step();
    assert_eq!(s2.preempted, [2], "the most recently admitted yields");
    let all = run_to_end(&mut e);
    let finished: Vec<RequestId> = all
        .iter()
        .flat_map(|s| s.finished.iter().map(|f| f.id))
        .collect();
    assert_eq!(finished, [1, 2], "both complete; 2 after recomputing");
    let f2 = all
        .iter()
        .flat_map(|s| &s.finished)
        .find(|f| f.id == 2)
        .unwrap();
    assert_eq!(f2.output_tokens, 3);
}

#[test]
fn clearing_the_cache_reports_it() {
    let mut e = Engine::new(Profile::tiny(10, 8, 64), true);
    assert!(e.add(req(1, &seq(0, 8), 1)));
    run_to_end(&mut e);
    assert_eq!(e.clear_cache(), [KvEvent::AllBlocksCleared]);
    assert!(e.cached_hashes().is_empty());
    assert!(e.add(req(2, &seq(0, 8), 1)));
    assert_eq!(
        run_to_end(&mut e)[0].prefill_tokens,
        8,
        "nothing cached any more"
    );
}

#[test]
fn synthetic_prompts_share_blocks_by_content_id() {
    let mut e = Engine::new(Profile::tiny(100, 8, 512), false);
    let p = |ids: &[u64], len| PromptTokens::Synthetic {
        ids: Arc::from(ids),
        unit: 8,
        len,
    };
    assert!(e.add(SimRequest {
        id: 1,
        prompt: p(&[7, 8, 9], 24),
        max_tokens: 1,
        lora: None,
    }));
    run_to_end(&mut e);
    assert!(e.add(SimRequest {
        id: 2,
        prompt: p(&[7, 8, 5], 24),
        max_tokens: 1,
        lora: None,
    }));
    assert_eq!(run_to_end(&mut e)[0].finished[0].cached_tokens, 16);
    assert_eq!(p(&[7], 8).tokens(0, 8), p(&[7, 1], 16).tokens(0, 8));
}

/// Blocks a step reported stored.
fn stored_blocks(report: &StepReport) -> usize {
    report
        .events
        .iter()
        .map(|ev| match ev {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes.len(),
            _ => 0,
        })
        .sum()
}

/// A prompt computed on a prefill pod arrives with its KV: the engine computes only its
/// last token, caches (and reports) the loaded blocks, and the next request sharing the
/// prompt hits them. A partly cached prompt loads only what is missing.
#[test]
fn a_transferred_prompt_is_loaded_not_computed() {
    let mut e = Engine::new(Profile::tiny(100, 8, 64), true);
    let prompt = seq(0, 64);
    assert!(e.add_transferred(req(1, &prompt, 2)));
    let first = e.step();
    assert_eq!(
        first.prefill_tokens, 4,
        "only the last block's tokens are computed"
    );
    assert_eq!(first.first_tokens, [1]);
    assert_eq!(
        stored_blocks(&first),
        16,
        "the 15 loaded blocks and the computed last one"
    );
    run_to_end(&mut e);
    assert!(e.add(req(2, &prompt, 1)));
    assert_eq!(
        e.step().prefill_tokens,
        4,
        "the loaded blocks are cache hits"
    );

    // A prompt sharing the first 32 tokens: 8 blocks hit, 7 are loaded.
    let mut longer = seq(0, 32);
    longer.extend(seq(1000, 32));
    assert!(e.add_transferred(req(3, &longer, 1)));
    let report = e.step();
    assert_eq!(report.prefill_tokens, 4);
    assert_eq!(
        stored_blocks(&report),
        8,
        "7 loaded and the last computed; the shared 8 were held"
    );
}

fn lora_req(id: RequestId, tokens: &[u32], max_tokens: usize, lora: Option<&str>) -> SimRequest {
    SimRequest {
        lora: lora.map(Arc::from),
        ..req(id, tokens, max_tokens)
    }
}

#[test]
fn adapters_beyond_the_slots_wait_and_each_load_costs_time() {
    // One adapter slot, loads of 50 µs.
    let mut e = Engine::new(Profile::tiny(100, 8, 64).with_max_loras(1), false);
    assert!(e.add(lora_req(1, &seq(0, 8), 3, Some("a"))));
    assert!(e.add(lora_req(2, &seq(20, 8), 1, Some("b"))));
    assert!(e.add(lora_req(3, &seq(40, 4), 1, None)));
    let first = e.step();
    // `a` loads and runs; `b` cannot join the batch; the base model's request can.
    assert_eq!(first.prefill_tokens, 12);
    assert_eq!(first.duration_us, 100 + 12 + 50);
    let names = |v: Vec<Arc<str>>| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(names(e.running_loras()), ["a"]);
    assert_eq!(names(e.waiting_loras()), ["b"]);
    let second = e.step();
    assert_eq!(
        second.duration_us,
        100 + 10,
        "`a` is held: one decode, no load"
    );
    let rest = run_to_end(&mut e);
    // `b` starts once `a` is done, replacing it: a second load.
    let b_first = rest.iter().find(|s| s.first_tokens.contains(&2)).unwrap();
    assert_eq!(b_first.duration_us, 100 + 8 + 50);
    assert_eq!(e.lora_loads(), 2);
    assert!(e.running_loras().is_empty() && e.waiting_loras().is_empty());
    // An adapter's blocks are its own: the same tokens for the base model hit nothing,
    // for `a` again they do (`a` loads again: `b` holds the slot).
    assert!(e.add(lora_req(4, &seq(0, 8), 1, None)));
    assert_eq!(run_to_end(&mut e)[0].finished[0].cached_tokens, 0);
    assert!(e.add(lora_req(5, &seq(0, 8), 1, Some("a"))));
    let again = run_to_end(&mut e);
    assert_eq!(again[0].finished[0].cached_tokens, 4);
    assert_eq!(e.lora_loads(), 3);
    // A pod with no slot serves no adapter.
    let mut plain = Engine::new(Profile::tiny(100, 8, 64), false);
    assert!(!plain.add(lora_req(6, &seq(0, 8), 1, Some("a"))));
    assert!(plain.add(lora_req(7, &seq(0, 8), 1, None)));
}

#[test]
fn evicted_blocks_move_to_host_memory_and_come_back_cheaper_than_prefill() {
    // 4 GPU blocks and 2 in host memory, of 4 tokens; copying back costs 0.25 µs a token.
    let profile = Profile::tiny(4, 8, 64)
        .with_cpu_offload_tokens(8)
        .with_max_loras(1);
    let mut e = Engine::new(profile, true);
    assert!(e.add(lora_req(1, &seq(0, 8), 1, Some("x"))));
    let mut e_plain_hashes = Vec::new();
    for s in run_to_end(&mut e) {
        for ev in s.events {
            if let KvEvent::BlockStored { block_hashes, .. } = ev {
                e_plain_hashes.extend(block_hashes);
            }
        }
    }
    assert!(e.add(lora_req(2, &seq(50, 8), 1, None))); // the two never-used blocks
    run_to_end(&mut e);
    // Two more blocks: the first request's, tail first, go to host memory.
    assert!(e.add(lora_req(3, &seq(90, 8), 1, None)));
    let s = run_to_end(&mut e);
    let (a0, a1) = (e_plain_hashes[0], e_plain_hashes[1]);
    assert_eq!(
        s[0].events[..3],
        [
            KvEvent::BlockStored {
                block_hashes: vec![a1],
                parent_block_hash: Some(a0),
                token_ids: seq(4, 4),
                block_size: 4,
                lora_name: Some("x".into()),
                medium: Medium::Cpu,
            },
            KvEvent::BlockStored {
                block_hashes: vec![a0],
                parent_block_hash: None,
                token_ids: seq(0, 4),
                block_size: 4,
                lora_name: Some("x".into()),
                medium: Medium::Cpu,
            },
            KvEvent::BlockRemoved {
                block_hashes: vec![a1, a0],
                medium: Medium::Gpu,
            },
        ],
        "stored in host memory before the GPU lets go"
    );
    assert_eq!(e.cpu_hashes().len(), 2);
    // The first prompt again: both blocks from host memory, copied (2 µs), the rest
    // prefilled (4 tokens).
    let mut again = seq(0, 8);
    again.extend(seq(200, 4));
    assert!(e.add(lora_req(4, &again, 1, Some("x"))));
    let s = run_to_end(&mut e);
    assert_eq!(s[0].finished[0].cached_tokens, 8);
    assert_eq!(s[0].prefill_tokens, 4);
    assert_eq!(s[0].duration_us, 100 + 4 + 2);
    assert!(s[0].events.contains(&KvEvent::BlockStored {
        block_hashes: vec![a0, a1],
        parent_block_hash: None,
        token_ids: seq(0, 8),
        block_size: 4,
        lora_name: Some("x".into()),
        medium: Medium::Gpu,
    }));
    // Host memory was full: what it dropped is announced with its medium.
    assert!(s[0].events.iter().any(|ev| matches!(
        ev,
        KvEvent::BlockRemoved {
            medium: Medium::Cpu,
            ..
        }
    )));
    assert_eq!(e.prefix_cache_counts(), (8 + 8 + 8 + 12, 8));
    e.clear_cache();
    assert!(e.cpu_hashes().is_empty() && e.cached_hashes().is_empty());
}

proptest::proptest! {
    /// Whatever the workload, a consumer applying the events (stores and removals per
    /// medium, clears) ends up knowing exactly what each tier holds.
    #[test]
    fn events_tell_what_each_tier_holds(
        prompts in proptest::collection::vec(
            (proptest::collection::vec(0u32..3, 1..12), 1usize..4, proptest::option::of(0u8..2)),
            1..40,
        ),
        cpu_tokens in 0usize..24,
    ) {
        use std::collections::{BTreeMap, BTreeSet};
        let profile = Profile::tiny(8, 4, 16).with_max_loras(1).with_cpu_offload_tokens(cpu_tokens);
        let mut e = Engine::new(profile, true);
        let mut held: BTreeMap<(u64, &str), ()> = BTreeMap::new();
        let apply = |held: &mut BTreeMap<(u64, &str), ()>, events: &[KvEvent]| {
            for ev in events {
                match ev {
                    KvEvent::BlockStored { block_hashes, medium, .. } => {
                        for h in block_hashes {
                            held.insert((*h, medium.as_str()), ());
                        }
                    }
                    KvEvent::BlockRemoved { block_hashes, medium } => {
                        for h in block_hashes {
                            held.remove(&(*h, medium.as_str()));
                        }
                    }
                    KvEvent::AllBlocksCleared => held.clear(),
                }
            }
        };
        for (i, (tokens, out, lora)) in prompts.into_iter().enumerate() {
            // Few distinct tokens in blocks of 4: prompts share prefixes often.
            let tokens: Vec<u32> = tokens.iter().map(|t| t * 7).collect();
            let lora = lora.map(|l| if l == 0 { "p" } else { "q" });
            e.add(lora_req(i as u64, &tokens, out, lora));
            if i % 3 == 0 {
                let r = e.step();
                apply(&mut held, &r.events);
            }
        }
        while e.has_work() {
            let r = e.step();
            apply(&mut held, &r.events);
        }
        let of = |m: &str| held.keys().filter(|(_, t)| *t == m).map(|(h, _)| *h).collect::<BTreeSet<u64>>();
        proptest::prop_assert_eq!(of("GPU"), e.cached_hashes().into_iter().collect::<BTreeSet<_>>());
        proptest::prop_assert_eq!(of("CPU"), e.cpu_hashes().into_iter().collect::<BTreeSet<_>>());
    }
}
