//! The simulator's encoder (written from vLLM's definitions on its own) against this crate's
//! decoder: whatever the simulator sends, in either event encoding, decodes to the same
//! events.

use kvroute_events::{
    BlockStored, DEFAULT_MAX_BATCH_ENTRIES, FirstExtra, KvEvent, Medium, decode_batch,
};
use kvroute_sim::KvEvent as SimEvent;
use kvroute_sim::Medium as SimMedium;
use kvroute_sim::wire::{EventEncoding, encode_batch};
use proptest::prelude::*;

fn sim_event() -> impl Strategy<Value = SimEvent> {
    prop_oneof![
        (
            prop::collection::vec(any::<u64>(), 1..4),
            prop::option::of(any::<u64>()),
            1usize..5,
        )
            .prop_flat_map(|(hashes, parent, bs)| {
                let n = hashes.len() * bs;
                prop::collection::vec(any::<u32>(), n).prop_map(move |tokens| {
                    SimEvent::BlockStored {
                        block_hashes: hashes.clone(),
                        parent_block_hash: parent,
                        token_ids: tokens,
                        block_size: bs,
                        lora_name: (bs % 2 == 0).then(|| "sql".into()),
                        medium: if bs > 2 {
                            SimMedium::Cpu
                        } else {
                            SimMedium::Gpu
                        },
                    }
                })
            }),
        prop::collection::vec(any::<u64>(), 0..5).prop_flat_map(|block_hashes| {
            prop::sample::select(vec![SimMedium::Gpu, SimMedium::Cpu]).prop_map(move |medium| {
                SimEvent::BlockRemoved {
                    block_hashes: block_hashes.clone(),
                    medium,
                }
            })
        }),
        Just(SimEvent::AllBlocksCleared),
    ]
}

fn expected(e: &SimEvent) -> KvEvent {
    match e {
        SimEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            medium,
        } => KvEvent::BlockStored(BlockStored {
            block_hashes: block_hashes.clone(),
            parent_block_hash: *parent_block_hash,
            token_ids: token_ids.clone(),
            block_size: *block_size,
            lora_name: lora_name.as_deref().map(str::to_owned),
            first_extra: FirstExtra::None,
            medium: Medium::Named(medium.as_str().into()),
        }),
        SimEvent::BlockRemoved {
            block_hashes,
            medium,
        } => KvEvent::BlockRemoved {
            block_hashes: block_hashes.clone(),
            medium: Medium::Named(medium.as_str().into()),
        },
        SimEvent::AllBlocksCleared => KvEvent::AllBlocksCleared,
    }
}

proptest! {
    #[test]
    fn what_the_simulator_sends_decodes_to_the_same_events(
        events in prop::collection::vec(sim_event(), 0..6),
        ts in 0.0f64..2e9,
        rank in 0u32..8,
        map in any::<bool>(),
    ) {
        let encoding = if map { EventEncoding::Map } else { EventEncoding::Array };
        let batch = decode_batch(&encode_batch(ts, &events, rank, encoding), DEFAULT_MAX_BATCH_ENTRIES).unwrap();
        prop_assert_eq!(batch.ts, ts);
        prop_assert_eq!(batch.data_parallel_rank, Some(u64::from(rank)));
        prop_assert_eq!(batch.skipped, 0);
        let want: Vec<KvEvent> = events.iter().map(expected).collect();
        prop_assert_eq!(batch.events, want);
    }
}
