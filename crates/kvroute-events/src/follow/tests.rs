use kvroute_tokens::{BlockHasher, ExtraKeys};

use super::*;

const BS: usize = 2;

/// A batch storing one block of `tokens` (2) under engine hash `h` after `parent`, encoded
/// as vLLM's array form by hand.
fn stored(h: u8, parent: Option<u8>, tokens: [u8; 2]) -> Vec<u8> {
    let mut b = vec![0x93, 0x00, 0x91, 0x98, 0xab];
    b.extend_from_slice(b"BlockStored");
    b.extend([0x91, h]);
    b.push(parent.unwrap_or(0xc0));
    b.extend([0x92, tokens[0], tokens[1], BS as u8, 0xc0, 0xc0, 0xc0, 0x00]);
    b
}

fn removed(h: u8) -> Vec<u8> {
    let mut b = vec![0x93, 0x00, 0x91, 0x92, 0xac];
    b.extend_from_slice(b"BlockRemoved");
    b.extend([0x91, h, 0x00]);
    b
}

fn holds(index: &Shared<PrefixIndex>, tokens: &[u32]) -> u32 {
    let mut hashes = Vec::new();
    BlockHasher::new(BS).hash_tokens(tokens, &ExtraKeys::default(), &mut hashes);
    index
        .read()
        .match_prefix(&hashes)
        .first()
        .map_or(0, |m| m.blocks)
}

fn live(f: &mut Follower, index: &Shared<PrefixIndex>, seq: u64, payload: &[u8]) -> Order {
    let order = f.order(seq, payload);
    if order == Order::InOrder {
        f.apply(index, seq, payload).unwrap();
    }
    order
}

fn ok(r: Result<(Applied, usize), DecodeError>) {
    r.unwrap();
}

#[test]
fn a_gap_is_filled_from_the_last_batch_on_and_duplicates_are_skipped() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    let b1 = stored(2, Some(1), [3, 4]);
    assert_eq!(
        live(&mut f, &index, 0, &stored(1, None, [1, 2])),
        Order::InOrder
    );
    assert_eq!(live(&mut f, &index, 1, &b1), Order::InOrder);
    assert_eq!(holds(&index, &[1, 2, 3, 4]), 2);
    // Message 2 is lost; 3 arrives: a gap. The replay starts at the last batch applied.
    assert_eq!(f.order(3, &removed(3)), Order::Gap(2));
    assert_eq!(f.resume_from(), 1);
    let replay = [
        (1, b1),
        (2, stored(3, Some(2), [5, 6])),
        (3, removed(3)),
        (4, stored(4, Some(2), [7, 8])),
    ];
    let mut applied = 0;
    let outcome = f.catch_up(&index, &replay, |r| {
        r.unwrap();
        applied += 1;
    });
    assert_eq!((outcome, applied, f.expected()), (CatchUp::Synced, 3, 5));
    assert_eq!(
        holds(&index, &[1, 2, 3, 4, 5, 6]),
        2,
        "3 was stored, then removed"
    );
    assert_eq!(holds(&index, &[1, 2, 3, 4, 7, 8]), 3);
    // The live copies of 3 and 4 queued meanwhile are duplicates; other content under a
    // replayed number is a restarted publisher; 5 is next.
    assert_eq!(f.order(3, &removed(3)), Order::Duplicate);
    assert_eq!(f.order(4, &stored(4, Some(2), [7, 8])), Order::Duplicate);
    assert_eq!(f.order(4, &removed(9)), Order::Restart);
    assert_eq!(live(&mut f, &index, 5, &removed(4)), Order::InOrder);
    assert_eq!(holds(&index, &[1, 2, 3, 4, 7, 8]), 2);
    // Past the replay, a lower number is a restart, whatever it carries.
    assert_eq!(f.order(3, &removed(3)), Order::Restart);
}

#[test]
fn a_live_restart_clears_what_was_known() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    live(&mut f, &index, 0, &stored(1, None, [1, 2]));
    live(&mut f, &index, 1, &stored(2, Some(1), [3, 4]));
    // A new process numbers from 0 again; its cache is empty.
    assert_eq!(f.order(0, &stored(9, None, [5, 5])), Order::Restart);
    assert_eq!(f.resync_at(&index, 0), 2);
    assert_eq!(holds(&index, &[1, 2]), 0);
    assert_eq!(
        live(&mut f, &index, 0, &stored(9, None, [5, 5])),
        Order::InOrder
    );
    assert_eq!(holds(&index, &[5, 5]), 1);
}

#[test]
fn a_restart_seen_in_a_replay_clears_even_when_numbers_line_up() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    live(&mut f, &index, 0, &stored(1, None, [1, 2]));
    live(&mut f, &index, 1, &stored(2, Some(1), [3, 4]));
    // While disconnected the pod restarted and published batches 0..=2 of its own: batch 1
    // is not the batch 1 kvroute applied.
    let replay = [
        (0, stored(7, None, [9, 9])),
        (1, stored(8, Some(7), [8, 8])),
        (2, removed(8)),
    ];
    let outcome = f.catch_up(&index, &replay[f.resume_from() as usize..], ok);
    assert_eq!(outcome, CatchUp::Resynced(2));
    assert_eq!(
        holds(&index, &[1, 2]),
        0,
        "the old process's blocks are gone"
    );
    // From the new process, kvroute saw 1 (parent 7 unknown: skipped) and 2.
    assert_eq!(f.expected(), 3);
    assert_eq!(holds(&index, &[9, 9]), 0);
}

#[test]
fn an_unbuffered_batch_inside_a_replay_forgets_what_came_before() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    let b0 = stored(1, None, [1, 2]);
    live(&mut f, &index, 0, &b0);
    // The publisher failed to send (and buffer) batch 2: the replay skips it.
    let replay = vec![
        (0, b0),
        (1, stored(2, Some(1), [3, 4])),
        (3, stored(5, None, [6, 6])),
    ];
    let outcome = f.catch_up(&index, &replay, ok);
    assert_eq!(outcome, CatchUp::Resynced(2));
    assert_eq!(holds(&index, &[1, 2, 3, 4]), 0);
    assert_eq!(holds(&index, &[6, 6]), 1);
    assert_eq!(f.order(4, &removed(5)), Order::InOrder);
}

#[test]
fn a_fresh_stream_takes_the_replay_from_wherever_it_starts() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    assert_eq!(f.catch_up(&index, &[], ok), CatchUp::Empty);
    // Asked from 0; the buffer holds 7 on. Nothing was known: nothing is stale.
    let outcome = f.catch_up(&index, &[(7, stored(1, None, [1, 2]))], ok);
    assert_eq!((outcome, f.expected()), (CatchUp::Synced, 8));
    assert_eq!(holds(&index, &[1, 2]), 1);
}

#[test]
fn an_empty_replay_of_a_known_stream_cannot_be_verified() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    live(&mut f, &index, 0, &stored(1, None, [1, 2]));
    assert_eq!(f.catch_up(&index, &[], ok), CatchUp::Resynced(1));
    assert_eq!(f.order(0, &removed(1)), Order::InOrder);
}

#[test]
fn a_malformed_message_is_skipped_and_the_sequence_moves_on() {
    let index = Shared::new(PrefixIndex::new());
    let mut f = Follower::new(EndpointId::new("pod"), BS);
    assert!(f.apply(&index, 0, b"\xc1garbage").is_err());
    assert_eq!(f.order(1, &removed(1)), Order::InOrder);
}

#[test]
fn a_batch_over_the_entry_limit_forgets_the_endpoint_and_the_stream_goes_on() {
    let index = Shared::new(PrefixIndex::new());
    // A stored batch is 1 event + 1 hash + 2 token ids: 4 entries.
    let mut f = Follower::new(EndpointId::new("pod"), BS).with_max_entries(4);
    assert_eq!(
        live(&mut f, &index, 0, &stored(1, None, [1, 2])),
        Order::InOrder
    );
    assert_eq!(holds(&index, &[1, 2]), 1);
    // Two blocks in one event: 6 entries. What it stored or evicted is unknown, so what was
    // known is dropped rather than trusted.
    let mut big = vec![0x93, 0x00, 0x91, 0x98, 0xab];
    big.extend_from_slice(b"BlockStored");
    big.extend([
        0x92, 2, 3, 0x01, 0x92, 3, 4, BS as u8, 0xc0, 0xc0, 0xc0, 0x00,
    ]);
    assert_eq!(f.order(1, &big), Order::InOrder);
    assert_eq!(f.apply(&index, 1, &big), Err(DecodeError::TooLarge(4)));
    assert_eq!(holds(&index, &[1, 2]), 0);
    // The sequence moved on: the next batch is in order and applies.
    assert_eq!(
        live(&mut f, &index, 2, &stored(5, None, [7, 8])),
        Order::InOrder
    );
    assert_eq!(holds(&index, &[7, 8]), 1);
}
