use kvroute_core::{BlockHash, EndpointId, RequestHints};
use kvroute_index::Tier;

use super::*;
use crate::test_util::{registry, request};

const SLOT: SlotId = SlotId(0);

fn hashes(tokens: &[u32], extra: &ExtraKeys<'_>) -> Vec<BlockHash> {
    let mut out = Vec::new();
    BlockHasher::new(4).hash_tokens(tokens, extra, &mut out);
    out
}

/// What the producer says each endpoint holds of `req`'s prompt (`None`: no opinion).
fn held(
    producer: &PreciseProducer,
    req: &kvroute_core::InferenceRequest,
    eps: &[Arc<EndpointState>],
) -> Option<Vec<f64>> {
    let hints = RequestHints::default();
    let mut state = CycleState::new(1);
    producer.produce(&SchedulingRequest::new(Some(req), &hints), eps, &mut state);
    state.prefix(SLOT).map(|p| p.held.clone())
}

fn producer(index: &Arc<Shared<PrefixIndex>>, tokenizers: Tokenizers) -> PreciseProducer {
    PreciseProducer::new(
        SLOT,
        Arc::clone(index),
        4,
        [1.0, 0.8, 0.5],
        tokenizers,
        None,
    )
}

#[test]
fn longest_held_prefix_weighted_by_tier() {
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let eps = registry(3).snapshot();
    eps.iter().for_each(|e| e.set_events_confirmed(true));
    let tokens: Vec<u32> = (0..16).collect();
    let h = hashes(&tokens, &ExtraKeys::default());
    {
        let mut w = index.write();
        w.store(eps[0].id(), &h[..2], Tier::Gpu);
        w.store(eps[1].id(), &h, Tier::Gpu);
        w.store(eps[2].id(), &h[..2], Tier::Cpu);
        // A block held beyond a gap does not count.
        w.store(eps[0].id(), &h[3..], Tier::Gpu);
    }
    let p = producer(&index, Tokenizers::new());
    let req = request(Prompt::Tokens(tokens.clone()));
    let s = held(&p, &req, &eps).unwrap();
    assert_eq!(s[0], 0.5);
    assert_eq!(s[1], 1.0);
    assert!((s[2] - 0.4).abs() < 1e-12, "{s:?}");
    // A salted request names other blocks: nothing held.
    let mut salted = req.clone();
    salted.cache_salt = Some("tenant".into());
    assert_eq!(held(&p, &salted, &eps).unwrap(), [0.0; 3]);
    // An endpoint whose stream is broken: its entries are not trusted.
    eps[1].set_events_confirmed(false);
    assert_eq!(held(&p, &req, &eps).unwrap()[1], 0.0);
    // Shorter than a block: nothing held; text without a tokenizer: no opinion at all.
    assert_eq!(
        held(&p, &request(Prompt::Tokens(vec![1, 2])), &eps).unwrap(),
        [0.0; 3]
    );
    assert!(held(&p, &request(Prompt::Text("hello".into())), &eps).is_none());
}

#[test]
fn text_and_chat_prompts_are_tokenized_with_the_models_tokenizer() {
    let path = std::env::var("KVROUTE_TEST_TOKENIZER")
        .expect("KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json");
    let json = std::fs::read(&path).unwrap();
    let config =
        std::fs::read(std::path::Path::new(&path).with_file_name("tokenizer_config.json")).unwrap();
    let qwen = Arc::new(ModelTokenizer::new(&json, Some(&config)).unwrap());
    let mut tokenizers = Tokenizers::new();
    tokenizers.insert("qwen", Arc::clone(&qwen));
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let eps = registry(2).snapshot();
    eps.iter().for_each(|e| e.set_events_confirmed(true));
    let text = "The quick brown fox jumps over the lazy dog, again and again and again.";
    let mut req = request(Prompt::Text(text.into()));
    req.model = "qwen".into();
    // What the pod would report: the blocks of the tokens vLLM computes.
    let tokens = qwen.encode_prompt(&req.prompt, &req.chat).unwrap();
    assert!(tokens.len() >= 8);
    index.write().store(
        eps[1].id(),
        &hashes(&tokens, &ExtraKeys::default()),
        Tier::Gpu,
    );
    let p = producer(&index, tokenizers.clone());
    assert_eq!(held(&p, &req, &eps).unwrap(), [0.0, 1.0]);
    // A model without a tokenizer: no opinion.
    req.model = "other".into();
    assert!(held(&p, &req, &eps).is_none());
    // A LoRA adapter of the model: tokenized as the base, its blocks rooted at the adapter's
    // name, as vLLM reports them (`lora_name`).
    let mut with_adapter = tokenizers;
    with_adapter.insert_adapter("qwen-sql", "qwen");
    let p = producer(&index, with_adapter);
    req.model = "qwen-sql".into();
    assert_eq!(
        held(&p, &req, &eps).unwrap(),
        [0.0, 0.0],
        "base blocks do not serve it"
    );
    let lora = ExtraKeys {
        lora: Some("qwen-sql"),
        cache_salt: None,
    };
    index
        .write()
        .store(eps[0].id(), &hashes(&tokens, &lora), Tier::Gpu);
    assert_eq!(held(&p, &req, &eps).unwrap(), [1.0, 0.0]);
    // The token producer leaves the same ids in the cycle.
    let hints = RequestHints::default();
    let mut state = CycleState::new(0);
    let mut tokenizers = Tokenizers::new();
    tokenizers.insert("qwen", Arc::clone(&qwen));
    req.model = "qwen".into();
    TokenProducer::new(tokenizers).produce(
        &SchedulingRequest::new(Some(&req), &hints),
        &eps,
        &mut state,
    );
    assert_eq!(state.tokens(), Some(tokens.as_slice()));
}

/// A producer over `index` with 4-token blocks and speculative entries kept 2 s.
fn speculating(index: &Arc<Shared<PrefixIndex>>) -> PreciseProducer {
    PreciseProducer::new(
        SLOT,
        Arc::clone(index),
        4,
        [1.0, 0.8, 0.5],
        Tokenizers::new(),
        Some(Speculative::new(Duration::from_secs(2))),
    )
}

/// `speculativeIndexing`: a prompt routed to an endpoint counts as held there (its shared
/// prefix, by a sibling) before any event reports it, for `speculativeTTL`, then no more.
#[test]
fn a_routed_prompt_is_held_speculatively_until_its_ttl() {
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let eps = registry(2).snapshot();
    let p = speculating(&index);
    let hints = RequestHints::default();
    let first = request(Prompt::Tokens((0..16).collect()));
    let t0 = Instant::now();
    let mut state = CycleState::new(1);
    let at = |t: Instant| SchedulingRequest::new(Some(&first), &hints).at(t);
    p.produce(&at(t0), &eps, &mut state);
    assert_eq!(state.prefix(SLOT).unwrap().held, [0.0, 0.0]);
    p.decided(
        &at(t0),
        &state,
        &crate::Decision::new(Arc::clone(&eps[1]), Vec::new(), 16),
    );
    // A sibling sharing the first 12 tokens (3 of its 4 blocks), 50 ms later.
    let mut tokens: Vec<u32> = (0..12).collect();
    tokens.extend(100..104);
    let sibling = request(Prompt::Tokens(tokens));
    let mut state = CycleState::new(1);
    let then = |t: Instant| SchedulingRequest::new(Some(&sibling), &hints).at(t);
    p.produce(&then(t0 + Duration::from_millis(50)), &eps, &mut state);
    let info = state.prefix(SLOT).unwrap();
    assert_eq!(info.held, [0.0, 0.75]);
    assert_eq!(info.cached_tokens, [0, 12]);
    // Past the TTL it is forgotten; an endpoint that leaves takes its entries along.
    let mut state = CycleState::new(1);
    p.produce(&then(t0 + Duration::from_secs(3)), &eps, &mut state);
    assert_eq!(state.prefix(SLOT).unwrap().held, [0.0, 0.0]);
    p.decided(
        &at(t0),
        &state,
        &crate::Decision::new(Arc::clone(&eps[0]), Vec::new(), 16),
    );
    p.endpoints_changed(&eps[1..], &[eps[0].id().clone()]);
    let mut state = CycleState::new(1);
    p.produce(&then(t0 + Duration::from_millis(60)), &eps, &mut state);
    assert_eq!(state.prefix(SLOT).unwrap().held, [0.0, 0.0]);
}

/// A conversation's next turn, routed to the pod whose events report its history, is
/// recorded from there: only its new blocks enter the speculative entries, and a turn
/// after it, within the TTL, still matches it whole there.
#[test]
fn a_turn_is_recorded_from_where_its_pods_events_stop() {
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let eps = registry(2).snapshot();
    eps.iter().for_each(|e| e.set_events_confirmed(true));
    let p = speculating(&index);
    // The history (3 blocks) is reported on endpoint 1; the turn adds a fourth.
    let turn: Vec<u32> = (0..16).collect();
    let history = hashes(&turn[..12], &ExtraKeys::default());
    index.write().store(eps[1].id(), &history, Tier::Gpu);
    let hints = RequestHints::default();
    let req = request(Prompt::Tokens(turn.clone()));
    let t0 = Instant::now();
    let mut state = CycleState::new(1);
    p.produce(
        &SchedulingRequest::new(Some(&req), &hints).at(t0),
        &eps,
        &mut state,
    );
    assert_eq!(state.prefix(SLOT).unwrap().held, [0.0, 0.75]);
    p.decided(
        &SchedulingRequest::new(Some(&req), &hints).at(t0),
        &state,
        &crate::Decision::new(Arc::clone(&eps[1]), Vec::new(), 4),
    );
    let recorded = |i: usize| {
        p.speculative
            .as_ref()
            .unwrap()
            .recent
            .lock()
            .unwrap()
            .index
            .index()
            .endpoint_blocks(eps[i].id())
    };
    assert_eq!((recorded(0), recorded(1)), (0, 1), "the new block only");
    // The next turn, 50 ms later, before any event reports the fourth block.
    let mut next = turn;
    next.extend(200..204);
    let req = request(Prompt::Tokens(next));
    let mut state = CycleState::new(1);
    p.produce(
        &SchedulingRequest::new(Some(&req), &hints).at(t0 + Duration::from_millis(50)),
        &eps,
        &mut state,
    );
    let info = state.prefix(SLOT).unwrap();
    assert_eq!(info.held, [0.0, 0.8]);
    assert_eq!(info.cached_tokens, [0, 16]);
}

/// Chained block hashes of `tokens`, one block per token: a block's hash names its whole
/// prefix, as the model servers' do.
fn chained(tokens: &[u8]) -> Vec<BlockHash> {
    hashes(
        &tokens.iter().map(|&t| u32::from(t)).collect::<Vec<_>>(),
        &ExtraKeys::default(),
    )
    .into_iter()
    .take(tokens.len() / 4)
    .collect()
}

proptest::proptest! {
    /// Within the TTL, speculative entries recorded from where each pod's events stopped,
    /// read on from where the precise index's match stops, answer as a plain list of the
    /// whole prompts routed does: for each endpoint, the longest prefix any prompt routed
    /// there shares with the probe.
    #[test]
    fn speculative_entries_match_as_a_plain_list_does(
        pushes in proptest::collection::vec(
            (0u8..3, proptest::collection::vec(0u8..3, 4..48), 0usize..14),
            1..40,
        ),
        probe in proptest::collection::vec(0u8..3, 4..48),
    ) {
        let spec = Speculative::new(Duration::from_secs(2));
        let mut precise = PrefixIndex::new();
        let t = Instant::now();
        let mut model: Vec<(EndpointId, Vec<BlockHash>)> = Vec::new();
        for (ep, tokens, reported) in pushes {
            let id = EndpointId::new(format!("e{ep}"));
            let blocks = chained(&tokens);
            // The pod's events had reported the first `reported` blocks when it was routed.
            let reported = reported.min(blocks.len());
            precise.store(&id, &blocks[..reported], Tier::Gpu);
            if reported < blocks.len() {
                spec.record(&id, &blocks[reported..], t);
            }
            model.push((id, blocks));
        }
        let probe = chained(&probe);
        let reported = precise.match_prefix(&probe);
        let mut got: Vec<(EndpointId, usize)> = reported
            .iter()
            .map(|m| (m.endpoint.clone(), m.blocks as usize))
            .collect();
        spec.matches(&probe, &reported, |_| true, t + Duration::from_millis(10), |e, n| {
            match got.iter_mut().find(|(g, _)| g == e) {
                Some((_, m)) => *m = (*m).max(n),
                None => got.push((e.clone(), n)),
            }
        });
        got.retain(|&(_, n)| n > 0);
        got.sort();
        let mut want: Vec<(EndpointId, usize)> = Vec::new();
        for (e, blocks) in &model {
            let n = blocks.iter().zip(&probe).take_while(|(a, b)| a == b).count();
            match want.iter_mut().find(|(w, _)| w == e) {
                Some((_, m)) => *m = (*m).max(n),
                None => want.push((e.clone(), n)),
            }
        }
        want.retain(|&(_, n)| n > 0);
        want.sort();
        proptest::prop_assert_eq!(got, want);
    }
}
