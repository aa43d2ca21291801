use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_core::{ApiKind, Endpoint, EndpointId, InferenceRequest, Prompt, RequestHints};
use kvroute_endpoints::{EndpointState, InFlightGuard, PodLoad, PromptTotals, Registry};
use kvroute_events::{Applier, BlockStored, FirstExtra, KvEvent, Medium};
use kvroute_index::{PrefixIndex, Shared};
use kvroute_scheduler::config::{DEFAULT_APPROX, DEFAULT_PD, DEFAULT_PRECISE};
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, Scheduler, SchedulingRequest};
use kvroute_sim::{
    Engine, KvEvent as SimEvent, PREFILL_ID_BIT, PodView, RequestId, RouteFn, SimRequest,
    StepReport,
};
use kvroute_tokens::{BlockHasher, ExtraKeys};

use crate::baselines::{DynamoCost, SglangCacheAware, SglangConfig};
use crate::synthetic::Rng;

/// The Inference Extension's approximate prefix routing: prefix 3 against load 4 (its queue
/// 2 + KV-utilisation 2, stood in for by in-flight counts, min–max normalised).
const APPROX_PREFIX: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: load-scorer
  parameters: {headroom: 1}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: load-scorer, weight: 4}
";

/// Precise prefix matching from the pods' events, 3, against load, 4.
const PRECISE_PREFIX: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
- type: load-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 3}
  - {pluginRef: load-scorer, weight: 4}
";

/// kvroute's profile without events with upstream's `lora-affinity-scorer` added, weighed
/// as the prefix and TTFT scorers are: a pod already running the request's adapter, then
/// one with a free slot, ahead of one that must swap.
fn approx_with_lora() -> String {
    DEFAULT_APPROX
        .replace(
            "- type: max-score-picker\n",
            "- type: lora-affinity-scorer\n- type: max-score-picker\n",
        )
        .replace(
            "  - pluginRef: max-score-picker",
            "  - pluginRef: lora-affinity-scorer\n    weight: 4\n  - pluginRef: max-score-picker",
        )
}

/// A routing policy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Each pod in turn.
    RoundRobin,
    /// A uniformly random pod (seeded).
    Random,
    /// Fewest requests in flight (kvroute's `--policy least-in-flight`).
    LeastLoad,
    /// SGLang router's `cache_aware` policy, re-implemented (`baselines::sglang`).
    SglangCacheAware,
    /// NVIDIA Dynamo's KV-router cost function, re-implemented, fed by the pods' KV events
    /// (`baselines::dynamo`).
    DynamoKv,
    /// Approximate prefix affinity with the Inference Extension's weights: prefix 3 against
    /// load 4 (its queue 2 + KV-utilisation 2, both stood in for by in-flight counts), load
    /// normalised min–max as its queue scorer does.
    ApproxPrefix,
    /// Precise prefix affinity alone, from the pods' KV events through `kvroute-events`
    /// (as llm-d's precise scorer without speculative entries): precise prefix 3, load 4
    /// with an 8-request headroom.
    PrecisePrefix,
    /// kvroute's default profile for a pool without KV events
    /// (`deploy/config/kvroute.yaml`): approximate prefix 4, TTFT 4, load 2 with an
    /// 8-request headroom.
    KvrouteApprox,
    /// kvroute's default profile for a pool publishing KV events
    /// (`deploy/config/kvroute-precise.yaml`): precise prefix 2, approximate prefix 2,
    /// TTFT 4, load 2.
    Kvroute,
    /// [`Policy::KvrouteApprox`] with `lora-affinity-scorer` (weight 4, as the prefix and
    /// TTFT scorers), which reads the adapters each pod runs from its scraped
    /// `vllm:lora_requests_info` (`--scrape-ms`).
    KvrouteLora,
    /// A greedy oracle no router can be: before each decision it asks every pod for its
    /// exact cache and queue, and sends the request where its own prefill would start and
    /// end soonest (fewest queued prefill tokens plus this prompt's uncached tokens; then
    /// fewest requests). Blind to what requests already routed will do next.
    Oracle,
}

impl Policy {
    /// Every policy, in report order.
    pub const ALL: [Policy; 11] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastLoad,
        Policy::SglangCacheAware,
        Policy::DynamoKv,
        Policy::ApproxPrefix,
        Policy::PrecisePrefix,
        Policy::KvrouteApprox,
        Policy::Kvroute,
        Policy::KvrouteLora,
        Policy::Oracle,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::LeastLoad => "least-load",
            Self::SglangCacheAware => "sglang-cache-aware",
            Self::DynamoKv => "dynamo-kv",
            Self::ApproxPrefix => "approx-prefix",
            Self::PrecisePrefix => "precise-prefix",
            Self::KvrouteApprox => "kvroute-approx",
            Self::Kvroute => "kvroute",
            Self::KvrouteLora => "kvroute-lora",
            Self::Oracle => "oracle",
        }
    }

    /// The policy named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the policy reads the pods' KV events.
    pub fn uses_events(self) -> bool {
        matches!(self, Self::DynamoKv | Self::PrecisePrefix | Self::Kvroute)
    }
}

/// The pods' KV events, applied by `kvroute-events` to the index the precise policies read.
struct EventFeed {
    index: Arc<Shared<PrefixIndex>>,
    applier: Applier,
    ids: Vec<EndpointId>,
    hasher: BlockHasher,
}

impl EventFeed {
    fn apply(&mut self, pod: usize, events: &[SimEvent]) {
        let Some(id) = self.ids.get(pod) else {
            return;
        };
        let events: Vec<KvEvent> = events.iter().map(convert).collect();
        self.applier.apply(&self.index, id, &events);
    }
}

/// The simulator's event as vLLM's wire would carry it to kvroute.
fn convert(e: &SimEvent) -> KvEvent {
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

/// Routes simulator arrivals with one policy, through kvroute's scheduler where the policy
/// is one of kvroute's, and keeps the router-side books: in-flight claims, decision time,
/// each pod's busy time.
pub struct PolicyRouter {
    policy: Policy,
    next: usize,
    rng: Rng,
    scheduler: Option<Scheduler>,
    events: Option<EventFeed>,
    sglang: Option<SglangCacheAware>,
    dynamo: Option<DynamoCost>,
    endpoints: Arc<Vec<Arc<EndpointState>>>,
    claims: HashMap<RequestId, InFlightGuard>,
    /// The prefill pod of the last decision, when it was disaggregated.
    prefill: Option<usize>,
    /// Scrapes of the pods' `/metrics` as `kvroute serve` takes them: every `.0` simulated
    /// microseconds, the next at `.1`.
    scrape: Option<(u64, u64)>,
    /// Nanoseconds each routing decision took (every policy but round-robin and random).
    pub decision_ns: Vec<u64>,
    /// Simulated microseconds each pod spent stepping.
    pub busy_us: Vec<u64>,
    /// Simulated time 0 as an `Instant`: claims are taken and released on the simulated
    /// clock, so the speeds endpoints learn from them are the simulated pods'.
    epoch: Instant,
    /// Prompts sent as text of this many bytes a token, not as token ids (policies without
    /// events, which read text as `serve` does without a tokenizer).
    text: Option<TextPrompts>,
}

/// Prompts as text: what a client sends when the pods tokenize, at a tokenizer's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextPrompts {
    /// Bytes of text each token stands for (1 to 8).
    pub bytes_per_token: usize,
    /// Whether answers report their usage (`prompt_tokens`), from which kvroute learns
    /// each pod's rate; a client that streams without `include_usage` gets none.
    pub usage: bool,
}

/// Letters a token's text is spelt with: ASCII, so every token is `bytes_per_token` bytes.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `tokens` as text, `bytes_per_token` letters each, spelt from a hash of the id: equal
/// token sequences give equal text, so shared prefixes stay shared.
fn render(tokens: &[u32], bytes_per_token: usize) -> String {
    let mut text = Vec::with_capacity(tokens.len() * bytes_per_token);
    for &t in tokens {
        let h = u64::from(t).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        text.extend((0..bytes_per_token).map(|i| ALPHABET[((h >> (58 - 6 * i)) & 63) as usize]));
    }
    // Only ASCII letters went in.
    String::from_utf8(text).unwrap_or_default()
}

impl std::fmt::Debug for PolicyRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyRouter")
            .field("policy", &self.policy)
            .field("pods", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl PolicyRouter {
    /// A router over `pods` pods (endpoint `pod-0000` is pod 0, and so on) whose engines
    /// cache blocks of `block_size` tokens.
    pub fn new(policy: Policy, pods: usize, block_size: usize) -> Self {
        Self::with_roles(policy, pods, block_size, 0, None)
    }

    /// [`PolicyRouter::new`] over a pool whose first `prefill_pods` pods compute prompts
    /// and whose others decode (`llm-d.ai/role`); kvroute's policies then route as
    /// `deploy/config/kvroute-pd.yaml` does (or as `config` says, when given), the others as
    /// over any pool.
    ///
    /// # Panics
    /// When `config` does not build: the caller checks it first
    /// ([`PolicyRouter::check_config`]).
    pub fn with_roles(
        policy: Policy,
        pods: usize,
        block_size: usize,
        prefill_pods: usize,
        config: Option<&'static str>,
    ) -> Self {
        let registry = Registry::new();
        registry.replace(
            (0..pods)
                .map(|i| Endpoint {
                    id: EndpointId::new(format!("pod-{i:04}")),
                    address: ([10, 0, (i >> 8) as u8, (i & 0xff) as u8], 8000).into(),
                    labels: match prefill_pods {
                        0 => Default::default(),
                        p => [(
                            "llm-d.ai/role".to_owned(),
                            if i < p { "prefill" } else { "decode" }.to_owned(),
                        )]
                        .into(),
                    },
                    rank: 0,
                })
                .collect(),
        );
        let endpoints = registry.snapshot();
        if policy.uses_events() {
            // In virtual time every event arrives, in order: every stream is in sequence.
            endpoints.iter().for_each(|e| e.set_events_confirmed(true));
        }
        let events = policy.uses_events().then(|| EventFeed {
            index: Arc::new(Shared::new(PrefixIndex::new())),
            applier: Applier::new(block_size),
            ids: endpoints.iter().map(|e| e.id().clone()).collect(),
            hasher: BlockHasher::new(block_size),
        });
        let mut ctx = BuildContext::new(block_size);
        ctx.precise_index = events.as_ref().map(|feed| Arc::clone(&feed.index));
        let with_lora = approx_with_lora();
        let config = match policy {
            Policy::KvrouteApprox | Policy::Kvroute if config.is_some() => config,
            Policy::KvrouteApprox | Policy::Kvroute if prefill_pods > 0 => Some(DEFAULT_PD),
            Policy::ApproxPrefix => Some(APPROX_PREFIX),
            Policy::PrecisePrefix if events.is_some() => Some(PRECISE_PREFIX),
            Policy::KvrouteApprox => Some(DEFAULT_APPROX),
            Policy::Kvroute if events.is_some() => Some(DEFAULT_PRECISE),
            Policy::KvrouteLora => Some(with_lora.as_str()),
            _ => None,
        };
        // The same configurations and plugin code `kvroute serve` runs; these are fixed
        // texts (or one `check_config` accepted), so failing to build one is a bug.
        let scheduler = match policy {
            Policy::LeastLoad => Some(Scheduler::least_in_flight(0)),
            _ => config.map(|text| {
                EndpointPickerConfig::parse(text)
                    .and_then(|c| c.build(&ctx))
                    .unwrap_or_else(|e| panic!("built-in configuration for {policy:?}: {e}"))
            }),
        };
        Self {
            policy,
            next: 0,
            rng: Rng::new(0x9e37_79b9_7f4a_7c15),
            scheduler,
            events,
            sglang: (policy == Policy::SglangCacheAware)
                .then(|| SglangCacheAware::new(SglangConfig::default(), pods)),
            dynamo: (policy == Policy::DynamoKv).then(|| DynamoCost::new(pods, block_size)),
            endpoints,
            claims: HashMap::new(),
            prefill: None,
            scrape: None,
            decision_ns: Vec::new(),
            busy_us: vec![0; pods],
            epoch: Instant::now(),
            text: None,
        }
    }

    /// Whether `config` builds for kvroute's policies (with and without KV events), and
    /// why not.
    pub fn check_config(config: &str, block_size: usize) -> Result<(), String> {
        let mut ctx = BuildContext::new(block_size);
        ctx.precise_index = Some(Arc::new(Shared::new(PrefixIndex::new())));
        EndpointPickerConfig::parse(config)
            .and_then(|c| c.build(&ctx))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The same router, knowing that each pod's KV cache holds `tokens` (as a scrape of
    /// vLLM's `cache_config_info` tells `serve`; `autoTune` sizes the approximate index by
    /// it).
    pub fn with_pod_capacity(self, tokens: u64) -> Self {
        self.endpoints
            .iter()
            .for_each(|e| e.set_kv_capacity_tokens(tokens));
        self
    }

    /// The same router, reading each pod's waiting and running requests and KV usage every
    /// `every_us` simulated microseconds from `phase_us` on (`--refresh-metrics-interval`),
    /// as the load scorers do in a cluster. Without it the router knows only its own
    /// in-flight requests.
    pub fn with_scrapes(mut self, every_us: u64, phase_us: u64) -> Self {
        self.scrape = Some((every_us.max(1), phase_us));
        self
    }

    /// Sends prompts as text (`text`) to policies without events: kvroute's approximate
    /// index then reads bytes, and learns each pod's bytes per token from the usage answers
    /// report, or with scrapes from the pods' counts of their prompts, as `serve` does.
    pub fn with_text_prompts(mut self, text: TextPrompts) -> Self {
        if !self.policy.uses_events() {
            self.text = Some(text);
        }
        self
    }

    /// Reads the pods' load if a scrape is due; with the `engines` at hand (the cluster
    /// hands them over) also their `vllm:lora_requests_info` (adapters running, waiting,
    /// slots).
    /// Simulated time `now_us` on the claims' clock.
    fn clock(&self, now_us: u64) -> Instant {
        self.epoch + Duration::from_micros(now_us)
    }

    fn scrape(&mut self, now_us: u64, pods: &[PodView], engines: &[Engine]) {
        let Some((every, next)) = &mut self.scrape else {
            return;
        };
        if now_us < *next {
            return;
        }
        *next = now_us + *every - (now_us - *next) % *every;
        let at = Instant::now();
        let names = |v: Vec<Arc<str>>| v.iter().map(|a| a.to_string()).collect();
        for (i, (ep, view)) in self.endpoints.iter().zip(pods).enumerate() {
            let mut load = scraped(view);
            if let Some(e) = engines.get(i)
                && e.profile().max_loras > 0
            {
                load.running_loras = names(e.running_loras());
                load.waiting_loras = names(e.waiting_loras());
                load.max_lora = u32::try_from(e.profile().max_loras).ok();
            }
            ep.record_scrape(load, at);
        }
    }

    /// Where this router would send `request` now, remembering nothing: another replica's
    /// opinion of a request it did not receive (`crate::Replicas`). Policies that do not
    /// go through kvroute's scheduler have no opinion (`None`).
    pub fn preview(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> Option<usize> {
        self.scrape(now_us, pods, engines);
        let scheduler = self.scheduler.as_ref()?;
        let parsed = self.parsed(request, self.tokens(request));
        let hints = RequestHints::default();
        let decision = scheduler
            .preview(
                &SchedulingRequest::new(Some(&parsed), &hints).at(self.clock(now_us)),
                &self.endpoints,
            )
            .ok()?;
        self.endpoints
            .iter()
            .position(|e| Arc::ptr_eq(e, decision.primary()))
    }

    /// The prompt's token ids, whole, as a client sends them: the approximate producers cap
    /// what they match themselves (`maxPrefixBlocksToMatch`), and the TTFT scorer must see
    /// the whole prompt's length, as it does in `kvroute serve`.
    fn tokens(&self, request: &SimRequest) -> Vec<u32> {
        request.prompt.tokens(0, request.prompt.len())
    }

    /// The completion request a client would send for `request`, carrying `tokens` (as
    /// text, with [`PolicyRouter::with_text_prompts`]): its adapter's name as the model, if
    /// it names one.
    fn parsed(&self, request: &SimRequest, tokens: Vec<u32>) -> InferenceRequest {
        let prompt = match self.text {
            Some(text) => Prompt::Text(render(&tokens, text.bytes_per_token)),
            None => Prompt::Tokens(tokens),
        };
        InferenceRequest {
            api: ApiKind::Completions,
            model: request.lora.as_deref().unwrap_or("bench").into(),
            prompt,
            cache_salt: None,
            stream: true,
            max_tokens: Some(request.max_tokens as u64),
            chat: Default::default(),
            hints: RequestHints::default(),
        }
    }

    fn pick(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> usize {
        self.scrape(now_us, pods, engines);
        let n = pods.len().max(1);
        match self.policy {
            Policy::RoundRobin => {
                self.next = (self.next + 1) % n;
                return self.next;
            }
            // Seeded, so runs repeat.
            Policy::Random => return self.rng.below(n as u64) as usize,
            _ => {}
        }
        // What a real request would carry; generating it from content ids is not the
        // router's cost, so the clock starts after.
        let tokens = self.tokens(request);
        let started = Instant::now();
        let pod = if let Some(sglang) = &mut self.sglang {
            let loads: Vec<usize> = pods.iter().map(|p| p.in_flight).collect();
            sglang.route(now_us, &tokens, &loads)
        } else if let (Some(dynamo), Some(feed)) = (&mut self.dynamo, &self.events) {
            let mut blocks = Vec::new();
            feed.hasher
                .hash_tokens(&tokens, &ExtraKeys::default(), &mut blocks);
            let mut overlap = vec![0; n];
            for m in feed.index.read().match_prefix(&blocks) {
                // Ids are sorted, as the registry sorts its endpoints.
                if let Ok(i) = feed.ids.binary_search(&m.endpoint) {
                    overlap[i] = m.blocks;
                }
            }
            dynamo.route(request.id, tokens.len(), &blocks, &overlap)
        } else {
            self.schedule(now_us, request, tokens)
        };
        self.decision_ns
            .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        pod
    }

    fn schedule(&mut self, now_us: u64, request: &SimRequest, tokens: Vec<u32>) -> usize {
        let at = self.clock(now_us);
        let Some(scheduler) = &self.scheduler else {
            return 0;
        };
        let parsed = self.parsed(request, tokens);
        let hints = RequestHints::default();
        let decided = scheduler.schedule(
            &SchedulingRequest::new(Some(&parsed), &hints).at(at),
            &self.endpoints,
        );
        let Ok(decision) = decided else {
            return 0;
        };
        let position = |e: &Arc<EndpointState>| {
            self.endpoints
                .iter()
                .position(|x| Arc::ptr_eq(x, e))
                .unwrap_or(0)
        };
        let primary = decision.primary();
        self.prefill = decision.prefill().map(|(e, tokens)| {
            self.claims.insert(
                request.id | PREFILL_ID_BIT,
                e.acquire_with_prefill_at(tokens, at),
            );
            position(e)
        });
        self.claims.insert(
            request.id,
            primary.acquire_with_prefill_at(decision.prefill_tokens(), at),
        );
        position(primary)
    }
}

/// [`Policy::Oracle`]'s choice among `engines`.
fn oracle(request: &SimRequest, engines: &[Engine]) -> usize {
    let len = request.prompt.len();
    engines
        .iter()
        .enumerate()
        .min_by_key(|(i, e)| {
            let uncached = len - e.cached_prefix_tokens(&request.prompt).min(len);
            (
                e.queued_prefill_tokens() + uncached,
                e.waiting() + e.running(),
                *i,
            )
        })
        .map_or(0, |(i, _)| i)
}

/// What a scrape of a simulated pod would say of its load at this instant.
pub(crate) fn scraped(view: &PodView) -> PodLoad {
    PodLoad {
        waiting: u32::try_from(view.waiting).unwrap_or(u32::MAX),
        running: u32::try_from(view.running).unwrap_or(u32::MAX),
        kv_usage: view.kv_usage,
        prompts: Some(PromptTotals {
            tokens: view.finished_prompt_tokens as f64,
            requests: view.finished as f64,
        }),
        ..PodLoad::default()
    }
}

impl RouteFn for PolicyRouter {
    fn route_with_engines(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> usize {
        if self.policy == Policy::Oracle && !engines.is_empty() {
            let started = Instant::now();
            let pod = oracle(request, engines);
            self.decision_ns
                .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
            return pod;
        }
        self.pick(now_us, request, pods, engines)
    }

    fn take_prefill(&mut self) -> Option<usize> {
        self.prefill.take()
    }

    fn observe(&mut self, now_us: u64, pod: usize, report: &StepReport) {
        if let Some(b) = self.busy_us.get_mut(pod) {
            *b += report.duration_us;
        }
        if let Some(feed) = &mut self.events {
            feed.apply(pod, &report.events);
        }
        if let Some(dynamo) = &mut self.dynamo {
            for &id in &report.first_tokens {
                dynamo.first_token(id);
            }
            for f in &report.finished {
                dynamo.finished(f.id);
            }
        }
        let now = self.clock(now_us);
        for id in &report.first_tokens {
            if let Some(claim) = self.claims.get_mut(id) {
                claim.prefilled_at(now);
            }
        }
        for f in &report.finished {
            self.claims.remove(&f.id);
            // The answer, and its usage when the client asked for it, as a pod reports it:
            // the prompt's tokens, against the text it was sent as.
            if let (Some(text), Some(ep)) = (self.text, self.endpoints.get(pod)) {
                let tokens = f.prompt_tokens as u64;
                let usage = text.usage.then_some(tokens);
                ep.observe_answer(tokens * text.bytes_per_token as u64, usage);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use kvroute_sim::PromptTokens;

    use super::*;

    /// A request of `ids` 512-token units of synthetic content, answered in one token.
    pub(crate) fn req(id: RequestId, ids: &[u64]) -> SimRequest {
        SimRequest {
            id,
            prompt: PromptTokens::Synthetic {
                ids: Arc::from(ids),
                unit: 512,
                len: ids.len() * 512,
            },
            max_tokens: 1,
            lora: None,
        }
    }

    #[test]
    fn the_oracle_weighs_each_pods_cache_against_its_queue() {
        let profile = kvroute_sim::Profile::h100_llama31_8b().with_block_size(512);
        let mut engines: Vec<Engine> = (0..2)
            .map(|_| Engine::new(profile.clone(), false))
            .collect();
        // Pod 1 has served a 4-unit prompt: its blocks are cached there.
        assert!(engines[1].add(req(0, &[1, 2, 3, 4])));
        while engines[1].has_work() {
            engines[1].step();
        }
        let mut r = PolicyRouter::new(Policy::Oracle, 2, 512);
        let views = [PodView::default(); 2];
        let follow_up = req(1, &[1, 2, 3, 4, 5]);
        assert_eq!(engines[1].cached_prefix_tokens(&follow_up.prompt), 4 * 512);
        assert_eq!(r.route_with_engines(0, &follow_up, &views, &engines), 1);
        // A long prompt waits on pod 1: 16 units queued outweigh 4 cached.
        assert!(engines[1].add(req(2, &[50; 16])));
        assert_eq!(engines[1].queued_prefill_tokens(), 16 * 512);
        assert_eq!(r.route_with_engines(0, &follow_up, &views, &engines), 0);
        assert_eq!(r.decision_ns.len(), 2);
    }

    /// With the pods' scraped `vllm:lora_requests_info`, `kvroute-lora` sends an adapter's
    /// request to the pod running that adapter, though it is the busiest; without the
    /// scorer (`kvroute-approx`) the same request goes elsewhere.
    #[test]
    fn kvroute_lora_follows_the_adapter_a_pod_runs() {
        let profile = kvroute_sim::Profile::h100_llama31_8b()
            .with_block_size(512)
            .with_max_loras(1);
        let mut engines: Vec<Engine> = (0..4)
            .map(|_| Engine::new(profile.clone(), false))
            .collect();
        let with = |id, lora: &str, ids: &[u64]| SimRequest {
            lora: Some(Arc::from(lora)),
            ..req(id, ids)
        };
        assert!(engines[2].add(SimRequest {
            max_tokens: 100,
            ..with(0, "adapter-3", &[1, 2])
        }));
        engines[2].step();
        assert_eq!(engines[2].running_loras(), [Arc::from("adapter-3")]);
        let mut views = vec![PodView::default(); 4];
        views[2].running = 1;
        let next = with(1, "adapter-3", &[9]);
        let mut lora = PolicyRouter::new(Policy::KvrouteLora, 4, 512).with_scrapes(1_000, 0);
        assert_eq!(lora.route_with_engines(0, &next, &views, &engines), 2);
        let mut plain = PolicyRouter::new(Policy::KvrouteApprox, 4, 512).with_scrapes(1_000, 0);
        assert_ne!(plain.route_with_engines(0, &next, &views, &engines), 2);
    }

    /// Token ids as text: the same letters for the same ids, `bytes_per_token` a token,
    /// so a shared token prefix is a shared text prefix and nothing else is.
    #[test]
    fn rendered_text_keeps_prefixes_and_length() {
        let a = render(&[1, 2, 3], 2);
        let b = render(&[1, 2, 4], 2);
        assert_eq!((a.len(), b.len()), (6, 6));
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a, b);
        assert_eq!(render(&[7; 5], 8).len(), 40);
    }

    /// A step in which request `id`, of `prompt_tokens`, got its one token and finished.
    fn answered(id: RequestId, prompt_tokens: usize) -> StepReport {
        StepReport {
            first_tokens: vec![id],
            finished: vec![kvroute_sim::Finished {
                id,
                prompt_tokens,
                cached_tokens: 0,
                output_tokens: 1,
            }],
            ..StepReport::default()
        }
    }

    /// With prompts as text, kvroute's approximate profile reads bytes; answers that report
    /// their usage teach each pod the rate, and without usage nothing is learnt. The precise
    /// profile keeps token ids.
    #[test]
    fn text_prompts_teach_the_pods_bytes_per_token_through_usage() {
        let views = vec![PodView::default(); 2];
        for (usage, learnt) in [(true, Some(3.0)), (false, None)] {
            let text = TextPrompts {
                bytes_per_token: 3,
                usage,
            };
            let mut r = PolicyRouter::new(Policy::KvrouteApprox, 2, 512).with_text_prompts(text);
            // Four answers from each pod, wherever the requests were routed.
            for i in 0..8 {
                r.route(0, &req(i, &[i, i + 1, i + 2, i + 3]), &views);
                r.observe(0, (i % 2) as usize, &answered(i, 4 * 512));
            }
            for ep in r.endpoints.iter() {
                assert_eq!(ep.prompt_bytes_per_token(), learnt, "usage {usage}");
            }
        }
        let precise = PolicyRouter::new(Policy::Kvroute, 2, 512).with_text_prompts(TextPrompts {
            bytes_per_token: 3,
            usage: true,
        });
        assert_eq!(precise.text, None);
    }

    /// Without usage, a router that scrapes learns each pod's rate from the pod's count of
    /// the prompts it finished (`vllm:request_prompt_tokens`), as `serve` does.
    #[test]
    fn without_usage_scrapes_teach_the_pods_bytes_per_token() {
        let mut views = vec![PodView::default(); 2];
        let text = TextPrompts {
            bytes_per_token: 3,
            usage: false,
        };
        let mut r = PolicyRouter::new(Policy::KvrouteApprox, 2, 512)
            .with_text_prompts(text)
            .with_scrapes(1, 0);
        for i in 0..10 {
            r.route(i, &req(i, &[i, i + 1, i + 2, i + 3]), &views);
            let pod = (i % 2) as usize;
            views[pod].finished += 1;
            views[pod].finished_prompt_tokens += 4 * 512;
            r.observe(i, pod, &answered(i, 4 * 512));
        }
        for ep in r.endpoints.iter() {
            let v = ep.prompt_bytes_per_token().unwrap();
            assert!((v - 3.0).abs() < 1e-9, "{v}");
        }
    }

    /// A replica asked where it would send a request (`preview`, the replicas' agreement)
    /// reads it as `route` does: as text, with text prompts.
    #[test]
    fn a_preview_reads_text_prompts_as_routing_does() {
        let views = vec![PodView::default(); 4];
        let mut r =
            PolicyRouter::new(Policy::KvrouteApprox, 4, 512).with_text_prompts(TextPrompts {
                bytes_per_token: 2,
                usage: true,
            });
        let engines: Vec<Engine> = Vec::new();
        for i in 0..4 {
            let pod = r.route(0, &req(i, &[10 * i, 10 * i + 1, 10 * i + 2]), &views);
            r.observe(0, pod, &answered(i, 3 * 512));
            let follow_up = req(10 + i, &[10 * i, 10 * i + 1, 10 * i + 2, 99]);
            assert_eq!(
                r.preview(0, &follow_up, &views, &engines),
                Some(pod),
                "prompt {i}"
            );
        }
    }

    #[test]
    fn kvroute_sends_a_shared_prefix_home() {
        let mut r = PolicyRouter::new(Policy::Kvroute, 4, 512);
        let views = vec![PodView::default(); 4];
        // Each request's prefill is over before the next arrives (its first token is
        // reported), so no queue builds up and affinity alone decides.
        let prefilled = |r: &mut PolicyRouter, pod: usize, id: RequestId| {
            let report = StepReport {
                first_tokens: vec![id],
                ..StepReport::default()
            };
            r.observe(0, pod, &report);
        };
        let first = r.route(0, &req(0, &[1, 2, 3, 4]), &views);
        prefilled(&mut r, first, 0);
        for i in 1..4 {
            assert_eq!(
                r.route(0, &req(i, &[1, 2, 3, 4, 100 + i]), &views),
                first,
                "request {i}"
            );
            prefilled(&mut r, first, i);
        }
        assert_ne!(
            r.route(0, &req(9, &[7, 8]), &views),
            first,
            "other content, other pod"
        );
    }
}
