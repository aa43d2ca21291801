//! One scheduling cycle: producers, the profile handler, then the chosen profile's filters,
//! weighted scorers and picker.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};
use kvroute_core::EndpointId;
use kvroute_endpoints::{EndpointState, EndpointsListener, Health};

use crate::cycle::{Candidates, CycleState};
use crate::plugins::handler::SingleProfileHandler;
use crate::plugins::load::LoadScorer;
use crate::plugins::pickers::MaxScorePicker;
use crate::{BodyUse, Decision, Plugin, PrefillChoice, ScheduleError, SchedulingRequest};

/// A scheduling profile: filters, then weighted scorers summed per candidate, then a
/// picker.
#[derive(Debug)]
pub struct Profile {
    pub(crate) name: String,
    pub(crate) filters: Vec<Arc<dyn Plugin>>,
    pub(crate) scorers: Vec<(Arc<dyn Plugin>, f64)>,
    pub(crate) picker: Arc<dyn Plugin>,
}

impl Profile {
    /// The profile's name in the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugins it runs with their weights (filters and the picker weigh nothing).
    pub fn plugins(&self) -> impl Iterator<Item = (&Arc<dyn Plugin>, Option<f64>)> {
        self.filters
            .iter()
            .map(|f| (f, None))
            .chain(self.scorers.iter().map(|(s, w)| (s, Some(*w))))
            .chain(std::iter::once((&self.picker, None)))
    }
}

/// A configured scheduler: every plugin of one `EndpointPickerConfig`, built. Shared by every
/// request stream; each cycle borrows a [`CycleState`] from a pool, so a warm cycle allocates
/// nothing (unless a producer tokenizes, or the picker returns fallbacks).
pub struct Scheduler {
    plugins: Vec<(String, Arc<dyn Plugin>)>,
    producers: Vec<Arc<dyn Plugin>>,
    profiles: Vec<Profile>,
    handler: Arc<dyn Plugin>,
    prefill_stage: Option<PrefillStage>,
    slots: usize,
    body_use: BodyUse,
    pool: Mutex<Vec<Cycle>>,
    turn: AtomicU64,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("plugins", &self.plugins)
            .field("profiles", &self.profiles)
            .finish_non_exhaustive()
    }
}

/// Disaggregated serving, resolved from the handler's names: the profile that picks the
/// prefill endpoint, the decider that approves it, and the profile that routes a request
/// whole when a stage finds no endpoint.
#[derive(Debug)]
pub(crate) struct PrefillStage {
    pub(crate) profile: usize,
    pub(crate) decider: Arc<dyn Plugin>,
    pub(crate) fallback: Option<usize>,
}

/// A cycle's state and the framework's own per-candidate buffers.
#[derive(Debug, Default)]
struct Cycle {
    state: CycleState,
    kept: Vec<usize>,
    keep: Vec<bool>,
    totals: Vec<f64>,
    scores: Vec<f64>,
    picked: Vec<usize>,
    health: Vec<Health>,
}

/// Totals closer than this are ties: they differ only by float noise.
pub(crate) const TIE: f64 = 1e-9;

impl Scheduler {
    /// Assembles a scheduler. `plugins` are every configured plugin by name; `producers`
    /// those whose data some profile needs, in the order they run; `slots` the number of
    /// prefix slots the producers write.
    pub(crate) fn new(
        plugins: Vec<(String, Arc<dyn Plugin>)>,
        producers: Vec<Arc<dyn Plugin>>,
        profiles: Vec<Profile>,
        handler: Arc<dyn Plugin>,
        slots: usize,
    ) -> Self {
        let body_use = producers
            .iter()
            .chain(std::iter::once(&handler))
            .chain(
                profiles
                    .iter()
                    .flat_map(|p| p.plugins().map(|(plugin, _)| plugin)),
            )
            .map(|p| p.body_use())
            .max()
            .unwrap_or_default();
        Self {
            plugins,
            producers,
            profiles,
            handler,
            prefill_stage: None,
            slots,
            body_use,
            pool: Mutex::new(Vec::new()),
            turn: AtomicU64::new(0),
        }
    }

    /// Adds a prefill stage (disaggregated serving).
    pub(crate) fn with_prefill_stage(mut self, stage: PrefillStage) -> Self {
        self.prefill_stage = Some(stage);
        self
    }

    /// Fewest requests in flight wins, with `fallbacks` next-best endpoints listed after the
    /// primary; equal endpoints take turns.
    pub fn least_in_flight(fallbacks: usize) -> Self {
        let load: Arc<dyn Plugin> = Arc::new(LoadScorer::new(1, None));
        let picker: Arc<dyn Plugin> = Arc::new(MaxScorePicker::new(fallbacks + 1));
        let profile = Profile {
            name: "default".into(),
            filters: Vec::new(),
            scorers: vec![(Arc::clone(&load), 1.0)],
            picker: Arc::clone(&picker),
        };
        Self::new(
            vec![
                ("load-scorer".into(), load),
                ("max-score-picker".into(), picker),
            ],
            Vec::new(),
            vec![profile],
            Arc::new(SingleProfileHandler),
            0,
        )
    }

    /// What of a request's body the plugins that run need: the request path reads no body
    /// for [`BodyUse::None`], and hands tokenizing decisions on long bodies to its pool.
    pub fn body_use(&self) -> BodyUse {
        self.body_use
    }

    /// The configured profiles.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// Chooses targets for `request` among `endpoints` (sorted by id, as the registry keeps
    /// them), then tells the stateful plugins.
    pub fn schedule(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
    ) -> Result<Decision, ScheduleError> {
        if endpoints.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        self.with_cycle(|cycle| {
            let mut decided = self.run(request, endpoints, cycle, turn);
            if let Ok(decision) = &mut decided {
                for (_, plugin) in &self.plugins {
                    if let Some(header) = plugin.response_header(decision) {
                        decision.response_headers.push(header);
                    }
                    plugin.decided(request, &cycle.state, decision);
                }
            }
            decided
        })
    }

    /// What [`Scheduler::schedule`] would choose now, with nothing remembered and the
    /// tie-breaking turn left where it is: another replica's view of the same request, to
    /// measure how often active-active replicas agree (`kvroute bench --replicas`).
    pub fn preview(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
    ) -> Result<Decision, ScheduleError> {
        if endpoints.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let turn = self.turn.load(Ordering::Relaxed);
        self.with_cycle(|cycle| self.run(request, endpoints, cycle, turn))
    }

    /// Runs `f` with a cycle's buffers from the pool (allocated once per concurrent
    /// decision, then reused), and puts them back.
    fn with_cycle<T>(&self, f: impl FnOnce(&mut Cycle) -> T) -> T {
        let mut cycle = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        let out = f(&mut cycle);
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cycle);
        out
    }

    fn run(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        cycle: &mut Cycle,
        turn: u64,
    ) -> Result<Decision, ScheduleError> {
        cycle.state.reset(self.slots);
        for p in &self.producers {
            if let Some(producer) = p.producer() {
                producer.produce(request, endpoints, &mut cycle.state);
            }
        }
        let primary = match self.profiles.as_slice() {
            [_] => 0,
            many => self
                .handler
                .profile_handler()
                .map_or(0, |h| h.profile(request, many))
                .min(many.len() - 1),
        };
        let fallback = self.prefill_stage.as_ref().and_then(|s| s.fallback);
        let (pos, decision) = match self.run_whole(primary, request, endpoints, cycle, turn) {
            Ok(picked) => picked,
            Err(e) => {
                return Ok(self
                    .run_whole(fallback.ok_or(e)?, request, endpoints, cycle, turn)?
                    .1);
            }
        };
        let (Some(stage), Some(prompt)) = (&self.prefill_stage, cycle.state.prompt_tokens(request))
        else {
            return Ok(decision);
        };
        let cached = prompt - decision.prefill_tokens();
        let approved = stage
            .decider
            .decider()
            .is_some_and(|d| d.disaggregate(request, prompt, cached));
        if !approved {
            return Ok(decision);
        }
        match self.run_profile(
            &self.profiles[stage.profile],
            request,
            endpoints,
            cycle,
            turn,
        ) {
            // A pod that does both parts computes the prompt where it decodes.
            Ok((prefill, _)) if prefill == pos => Ok(decision),
            Ok((prefill, _)) => {
                let prefill_cached = cycle.state.cached_tokens(&[], prefill, prompt);
                let choice = PrefillChoice {
                    prompt_tokens: prompt,
                    decode: &endpoints[pos],
                    decode_cached: cached,
                    prefill: &endpoints[prefill],
                    prefill_cached,
                };
                if !stage.decider.decider().is_some_and(|d| d.confirm(&choice)) {
                    return Ok(decision);
                }
                Ok(decision.with_prefill(Arc::clone(&endpoints[prefill]), prompt - prefill_cached))
            }
            Err(e) => Ok(self
                .run_whole(fallback.ok_or(e)?, request, endpoints, cycle, turn)?
                .1),
        }
    }

    /// Routes the request whole with profile `index`: the position of the endpoint picked
    /// and the decision, which expects it to compute the prompt tokens it does not hold.
    fn run_whole(
        &self,
        index: usize,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        cycle: &mut Cycle,
        turn: u64,
    ) -> Result<(usize, Decision), ScheduleError> {
        let (pos, fallbacks) =
            self.run_profile(&self.profiles[index], request, endpoints, cycle, turn)?;
        let prefill = cycle
            .state
            .prompt_tokens(request)
            .map_or(0, |p| p - cycle.state.cached_tokens(&[], pos, p));
        Ok((
            pos,
            Decision::new(Arc::clone(&endpoints[pos]), fallbacks, prefill),
        ))
    }

    /// Runs one profile's filters, scorers and picker over every endpoint: the position of
    /// the endpoint it picks, and its fallbacks.
    fn run_profile(
        &self,
        profile: &Profile,
        request: &SchedulingRequest<'_>,
        endpoints: &[Arc<EndpointState>],
        cycle: &mut Cycle,
        turn: u64,
    ) -> Result<(usize, Vec<Arc<EndpointState>>), ScheduleError> {
        let Cycle {
            state,
            kept,
            keep,
            totals,
            scores,
            picked,
            health,
        } = cycle;
        kept.clear();
        kept.extend(0..endpoints.len());
        for f in &profile.filters {
            let Some(filter) = f.filter() else { continue };
            keep.clear();
            keep.resize(kept.len(), true);
            filter.filter(request, state, &Candidates::new(endpoints, kept), keep);
            let mut i = 0;
            kept.retain(|_| {
                i += 1;
                keep[i - 1]
            });
            if kept.is_empty() {
                return Err(ScheduleError::AllFiltered);
            }
        }
        // Passive health, among what the filters left, read once per endpoint (it changes
        // concurrently): ejected endpoints are left out unless nothing else is left (Envoy's
        // panic threshold), degraded ones are scored down below.
        let now = Instant::now();
        health.clear();
        health.extend(kept.iter().map(|&i| endpoints[i].health(now)));
        if health.iter().any(|&h| h != Health::Ejected) {
            let mut j = 0;
            kept.retain(|_| {
                j += 1;
                health[j - 1] != Health::Ejected
            });
            health.retain(|&h| h != Health::Ejected);
        }
        let candidates = Candidates::new(endpoints, kept);
        totals.clear();
        totals.resize(kept.len(), 0.0);
        for (s, weight) in &profile.scorers {
            let Some(scorer) = s.scorer() else { continue };
            scores.clear();
            scores.resize(kept.len(), 0.0);
            scorer.score(request, state, &candidates, scores);
            for (t, s) in totals.iter_mut().zip(scores.iter()) {
                let s = if s.is_finite() {
                    s.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                *t += weight * s;
            }
        }
        for (t, h) in totals.iter_mut().zip(health.iter()) {
            // Scaled, not sunk: a degraded endpoint still gets its turn among equals, so
            // it either recovers (a success clears it) or reaches the ejection threshold.
            // Weights are never negative (the configuration refuses them), so scaling
            // only ever lowers a total.
            if let Health::Degraded(factor) = h {
                *t *= factor;
            }
        }
        picked.clear();
        if let Some(picker) = profile.picker.picker() {
            picker.pick(totals, turn, picked);
        }
        // A picker that returns nothing (or out of range) gets the first candidate.
        let first = picked
            .first()
            .copied()
            .filter(|&i| i < kept.len())
            .unwrap_or(0);
        let pos = candidates.position(first);
        let fallbacks = picked
            .iter()
            .skip(1)
            .filter(|&&i| i < kept.len() && i != first)
            .map(|&i| Arc::clone(candidates.get(i)))
            .collect();
        Ok((pos, fallbacks))
    }

    /// The endpoint set changed: every plugin drops what it holds for `departed`.
    pub fn endpoints_changed(&self, current: &[Arc<EndpointState>], departed: &[EndpointId]) {
        for (_, plugin) in &self.plugins {
            plugin.endpoints_changed(current, departed);
        }
    }
}

/// The scheduler in use, replaced whole when the configuration is reloaded: a request that
/// started with the old one finishes with it, the next one gets the new one.
#[derive(Debug)]
pub struct SchedulerHandle {
    current: ArcSwap<Scheduler>,
}

impl SchedulerHandle {
    /// A handle serving `scheduler`.
    pub fn new(scheduler: Scheduler) -> Self {
        Self {
            current: ArcSwap::from_pointee(scheduler),
        }
    }

    /// The scheduler to use for one request. Cheap: no reference count is taken.
    pub fn load(&self) -> Guard<Arc<Scheduler>> {
        self.current.load()
    }

    /// Puts `scheduler` in service.
    pub fn store(&self, scheduler: Scheduler) {
        self.current.store(Arc::new(scheduler));
    }
}

impl EndpointsListener for SchedulerHandle {
    /// See [`Scheduler::endpoints_changed`].
    fn endpoints_changed(&self, current: &[Arc<EndpointState>], departed: &[EndpointId]) {
        self.current.load().endpoints_changed(current, departed);
    }
}
