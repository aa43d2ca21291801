//! `kvroute bench`: compare routing policies on a simulated cluster, in virtual time.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use kvroute_bench::{
    BenchReport, Deployment, Load, Policy, PolicyReport, PolicyRouter, TextPrompts, TraceRequest,
    Workload, load_mooncake, render_svg, run, run_deployed,
};
use kvroute_sim::Profile;

mod admission;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["trace", "workload"])))]
pub(crate) struct BenchArgs {
    /// A Mooncake-format trace (JSON lines: timestamp ms, input_length, output_length,
    /// hash_ids of 512-token blocks).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// A synthetic workload instead of a trace (seeded, see --requests, --rate, --seed).
    #[arg(long, value_enum)]
    workload: Option<WorkloadKind>,
    /// Synthetic workload: number of requests.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// Synthetic workload: mean arrival rate, requests per second (Poisson).
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    /// Synthetic workload: the gamma shape of the gaps between arrivals, as vLLM's
    /// `benchmark_serving --burstiness`: 1 is Poisson, below 1 burstier (0.25: gaps four
    /// times as variable), above 1 more even; the mean rate stays `--rate`.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Synthetic workload: output tokens per request.
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// Synthetic workload: random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated pods.
    #[arg(long, default_value_t = 16)]
    pods: usize,
    /// Pod profile (`docs/simulator.md`).
    #[arg(long, default_value = "h100-llama3.1-8b")]
    profile: String,
    /// KV-cache block size of the simulated pods, in tokens. The default, 512, is a Mooncake
    /// trace's unit of shared content (no sharing is lost, and runs are ~20x faster than
    /// with vLLM's 16).
    #[arg(long, default_value_t = 512)]
    block_size: usize,
    /// LoRA adapters each pod's batch may use at once (vLLM's `--max-loras`); requests for
    /// others wait, and each adapter not on the GPU costs a load. Needed by `--workload
    /// lora`.
    #[arg(long, default_value_t = 0)]
    max_loras: usize,
    /// Tokens of host memory per pod that blocks evicted from the GPU move to (vLLM's CPU
    /// offloading): a second, slower tier, announced in the pods' KV events.
    #[arg(long, default_value_t = 0)]
    cpu_offload_tokens: usize,
    /// Pods whose steps also pay attention's cost per token of context (each prefilled
    /// token's attention to what precedes it, each decode's read of its KV cache), which
    /// the profiles' linear figures leave out: a check that routing does not hinge on them
    /// (`docs/simulator.md`).
    #[arg(long)]
    context_cost: bool,
    /// Prompts reach the policies without KV events as text of this many bytes a token
    /// (1 to 8), as when the pods tokenize with a tokenizer of that rate; kvroute learns it
    /// from the usage the answers report. The precise policies keep token ids.
    #[arg(long)]
    text_bytes_per_token: Option<usize>,
    /// With --text-bytes-per-token: answers report no usage (a client that streams without
    /// `stream_options.include_usage`), so kvroute learns the rate only from the pods'
    /// counts of their prompts, which it reads with --scrape-ms.
    #[arg(long, requires = "text_bytes_per_token")]
    no_usage: bool,
    /// Policies to compare, comma-separated, or `all`: round-robin, random, least-load,
    /// sglang-cache-aware, dynamo-kv, approx-prefix, precise-prefix, kvroute-approx,
    /// kvroute, kvroute-lora, oracle.
    #[arg(long, default_value = "all")]
    policies: String,
    /// Divide the trace's arrival times by this (load goes up).
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Replay the trace this many times back to back (content shifted per copy).
    #[arg(long, default_value_t = 1)]
    copies: usize,
    /// Closed loop instead: this many users, each sending the trace's next request when
    /// their last one has finished (arrival times ignored). Measures throughput.
    #[arg(long)]
    users: Option<usize>,
    /// With --users: pause between a user's requests, milliseconds.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Router replicas (active-active), each receiving every Nth request and no other
    /// replica's decisions; reports how often the others would have chosen alike.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Each replica reads the pods' load (waiting, running, KV usage) this often, in
    /// simulated milliseconds, as `kvroute serve --refresh-metrics-interval` does; without
    /// it a router knows only the requests it sent itself.
    #[arg(long)]
    scrape_ms: Option<u64>,
    /// Disaggregated serving: this many of the pods compute prompts only and the rest
    /// decode; kvroute's policies route as `deploy/config/kvroute-pd.yaml` does (the
    /// others ignore the roles, serving every request whole).
    #[arg(long, default_value_t = 0)]
    prefill_pods: usize,
    /// A pool of unlike pods: this many of them run `--slowdown` times slower than the
    /// profile (an older GPU generation beside newer ones).
    #[arg(long, default_value_t = 0)]
    slow_pods: usize,
    /// With --slow-pods: how many times slower.
    #[arg(long, default_value_t = 2.0)]
    slowdown: f64,
    /// A routing configuration (`EndpointPickerConfig` YAML) for kvroute's policies to run
    /// instead of the shipped one: measure your own.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Goodput instead of one run: for each policy, the highest open-loop arrival rate
    /// (`--rate` for a workload, `--speedup` for a trace, scaled) at which TTFT p90 stays
    /// within this many milliseconds, found by doubling then bisecting.
    #[arg(long, conflicts_with = "users")]
    goodput_slo_ms: Option<f64>,
    /// A load sweep instead of one run: every policy open loop at each of these factors on
    /// the offered load (`--rate` for a workload, `--speedup` for a trace), comma-separated,
    /// e.g. `0.5,1,1.5,2`.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["users", "goodput_slo_ms"])]
    sweep: Option<Vec<f64>>,
    /// Also write the reports as JSON here (schema in docs/benchmarks.md).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw the TTFT CDF and throughput of each policy here, as SVG.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Goodput under overload with and without admission: this share of the requests is
    /// sheddable (priority < 0), and each policy runs open loop twice, without admission and
    /// with upstream's utilization detector refusing sheddable arrivals while the pool is
    /// saturated (what `serve` does without the flowControl gate).
    #[arg(long, conflicts_with_all = ["users", "goodput_slo_ms", "sweep"])]
    sheddable_share: Option<f64>,
    /// With --sheddable-share: a request is good when served with TTFT within this.
    #[arg(long, default_value_t = 1000.0)]
    ttft_slo_ms: f64,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Directory the charts are written to.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

/// The synthetic workloads, with the parameters `kvroute bench` uses.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum WorkloadKind {
    /// 32 tenants, 2k-token system prompts, a fresh question each.
    SharedPrompts,
    /// 150 tenants, 8k-token system prompts (1.2M tokens in all: more than a pod caches,
    /// less than a pool of four), a fresh question each: where spreading every tenant over
    /// every pod thrashes the caches.
    ManyTenants,
    /// 64 conversations of up to 8 turns whose history grows each turn.
    MultiTurn,
    /// 96 long conversations: each opens with 4k–24k tokens (a document, code) and goes on
    /// for 12 turns, its history growing by a question and an answer each; about as many
    /// tokens live as four 8B/H100 pods cache, so what is evicted and where each turn goes
    /// both count.
    LongChats,
    /// 8 documents of 16k tokens, many questions.
    DocQa,
    /// Conversations opening with 2k–40k tokens, back twice, minutes apart (mean 3 min):
    /// little reuse, prefill work to balance.
    LongRevisits,
    /// A new 8k-token document, then 7 more questions on it within 50 ms.
    SiblingBursts,
    /// 48 LoRA adapters of Zipf popularity, fresh 0.5k–2k-token prompts sharing nothing
    /// (with `--max-loras`).
    Lora,
    /// Several at once on one pool, each in content of its own: multi-turn conversations
    /// (40 % of requests), shared system prompts (30 %), sibling bursts (20 %) and long
    /// revisits (10 %).
    Mixed,
}

const SHARED_PROMPTS: Workload = Workload::SharedPrompts {
    tenants: 32,
    system_units: 4,
};
const MULTI_TURN: Workload = Workload::MultiTurn {
    conversations: 64,
    turns: 8,
    opening_units: (1, 1),
};
const LONG_REVISITS: Workload = Workload::LongRevisits {
    turns: 3,
    revisit_s: 180,
};
const SIBLING_BURSTS: Workload = Workload::SiblingBursts {
    doc_units: 16,
    siblings: 8,
    window_ms: 50,
};

/// `--workload mixed`: each part with its share of the requests.
const MIXED: &[(Workload, f64)] = &[
    (MULTI_TURN, 0.4),
    (SHARED_PROMPTS, 0.3),
    (SIBLING_BURSTS, 0.2),
    (LONG_REVISITS, 0.1),
];

impl WorkloadKind {
    fn workload(self) -> Workload {
        match self {
            Self::SharedPrompts => SHARED_PROMPTS,
            Self::ManyTenants => Workload::SharedPrompts {
                tenants: 150,
                system_units: 16,
            },
            Self::MultiTurn => MULTI_TURN,
            Self::LongChats => Workload::MultiTurn {
                conversations: 96,
                turns: 12,
                opening_units: (8, 48),
            },
            Self::DocQa => Workload::DocQa {
                docs: 8,
                doc_units: 32,
            },
            Self::LongRevisits => LONG_REVISITS,
            Self::SiblingBursts => SIBLING_BURSTS,
            Self::Lora => Workload::Lora {
                adapters: 48,
                units: 4,
            },
            Self::Mixed => Workload::Mixed(MIXED),
        }
    }
}

pub(crate) fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let mut profile = Profile::named(&args.profile)
        .with_context(|| format!("unknown profile {:?}", args.profile))?
        .with_block_size(args.block_size)
        .with_max_loras(args.max_loras)
        .with_cpu_offload_tokens(args.cpu_offload_tokens);
    if args.context_cost {
        profile = profile.with_context_cost();
    }
    anyhow::ensure!(
        !matches!(args.workload, Some(WorkloadKind::Lora)) || args.max_loras > 0,
        "--workload lora needs --max-loras (the adapters a pod's batch may use at once)"
    );
    anyhow::ensure!(args.pods > 0, "--pods must be at least 1");
    anyhow::ensure!(args.speedup > 0.0, "--speedup must be positive");
    anyhow::ensure!(
        args.burstiness.is_finite() && args.burstiness > 0.0,
        "--burstiness must be positive"
    );
    anyhow::ensure!(args.replicas > 0, "--replicas must be at least 1");
    anyhow::ensure!(args.scrape_ms != Some(0), "--scrape-ms must be at least 1");
    anyhow::ensure!(
        args.text_bytes_per_token
            .is_none_or(|b| (1..=8).contains(&b)),
        "--text-bytes-per-token must be between 1 and 8"
    );
    anyhow::ensure!(
        args.sweep
            .as_ref()
            .is_none_or(|f| !f.is_empty() && f.iter().all(|f| f.is_finite() && *f > 0.0)),
        "--sweep takes positive load factors"
    );
    anyhow::ensure!(
        args.slowdown.is_finite() && (0.1..=100.0).contains(&args.slowdown),
        "--slowdown must be between 0.1 and 100"
    );
    anyhow::ensure!(
        args.slow_pods <= args.pods,
        "--slow-pods cannot exceed --pods"
    );
    anyhow::ensure!(
        args.prefill_pods < args.pods,
        "--prefill-pods must leave at least one decode pod"
    );
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))?;
            PolicyRouter::check_config(&text, profile.block_size)
                .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
            // Read once for the whole run, which every router of every run shares.
            Some(&*Box::leak(text.into_boxed_str()))
        }
        None => None,
    };
    let deployment = Deployment {
        replicas: args.replicas,
        scrape_ms: args.scrape_ms,
        prefill_pods: args.prefill_pods,
        config,
        slow_pods: args.slow_pods,
        slowdown_pct: (args.slowdown * 100.0).round() as u32,
        text: args
            .text_bytes_per_token
            .map(|bytes_per_token| TextPrompts {
                bytes_per_token,
                usage: !args.no_usage,
            }),
    };
    let policies = if args.policies == "all" {
        Policy::ALL.to_vec()
    } else {
        args.policies
            .split(',')
            .map(|p| Policy::parse(p.trim()).with_context(|| format!("unknown policy {p:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if let Some(slo) = args.goodput_slo_ms {
        anyhow::ensure!(slo > 0.0, "--goodput-slo-ms must be positive");
        return run_goodput(args, &profile, &policies, deployment, slo);
    }
    if let Some(factors) = &args.sweep {
        return run_sweep(args, &profile, &policies, deployment, factors);
    }
    let trace = match (&args.trace, args.workload) {
        (Some(path), _) => load_mooncake(path)?,
        (None, Some(kind)) => {
            anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
            generate(args, kind, args.rate)
        }
        (None, None) => anyhow::bail!("give --trace or --workload"),
    };
    let (load, how) = match args.users {
        Some(users) => {
            anyhow::ensure!(users > 0, "--users must be at least 1");
            (
                Load::Closed {
                    users,
                    think_ms: args.think_ms,
                    copies: args.copies,
                },
                format!("closed loop, {users} users, think {} ms", args.think_ms),
            )
        }
        None => (
            Load::Open {
                speedup: args.speedup,
                copies: args.copies,
            },
            format!("open loop, speedup {}", args.speedup),
        ),
    };
    if let Some(share) = args.sheddable_share {
        return admission::run(args, &trace, &profile, &policies, deployment, share);
    }
    let reports: Vec<PolicyReport> = policies
        .into_iter()
        .map(|p| run_deployed(&trace, &profile, args.pods, p, load, deployment))
        .collect();
    let mut title = format!(
        "{} requests x{} on {} pods of {} ({}-token blocks), {how}",
        trace.len(),
        args.copies,
        args.pods,
        profile.name,
        profile.block_size,
    );
    if args.replicas > 1 {
        title.push_str(&format!(", {} router replicas", args.replicas));
    }
    if let Some(ms) = args.scrape_ms {
        title.push_str(&format!(", pod load read every {ms} ms"));
    }
    if let Some(path) = &args.config {
        title.push_str(&format!(", kvroute configured by {}", path.display()));
    }
    if args.slow_pods > 0 {
        title.push_str(&format!(
            ", {} of them {}x slower",
            args.slow_pods, args.slowdown
        ));
    }
    if args.prefill_pods > 0 {
        title.push_str(&format!(
            ", {} prefill and {} decode pods",
            args.prefill_pods,
            args.pods - args.prefill_pods
        ));
    }
    if profile.context_cost {
        title.push_str(", attention paid per token of context");
    }
    if let Some(b) = args.text_bytes_per_token {
        title.push_str(&format!(", prompts as text of {b} bytes a token"));
        if args.no_usage {
            title.push_str(" (no usage reported)");
        }
    }
    if profile.max_loras > 0 {
        title.push_str(&format!(", {} LoRA slots a pod", profile.max_loras));
    }
    if profile.cpu_blocks > 0 {
        title.push_str(&format!(
            ", {} tokens of CPU offload a pod",
            profile.cpu_blocks * profile.block_size
        ));
    }
    let mut out = table(&title, &reports);
    if let Some(Workload::Mixed(parts)) = args.workload.map(WorkloadKind::workload) {
        let names: Vec<&str> = parts.iter().map(|(w, _)| w.name()).collect();
        out.push_str(&parts_table(&names, &reports));
    }
    if let Some(path) = &args.chart {
        write_chart(path, &title, &reports)?;
        out.push_str(&format!("chart: {}\n", path.display()));
    }
    if let Some(path) = &args.json {
        write_json(path, &title, &profile, args.pods, reports)?;
        out.push_str(&format!("json: {}\n", path.display()));
    }
    if let Some(peak) = peak_rss_bytes() {
        out.push_str(&format!(
            "peak memory: {:.0} MiB\n",
            peak as f64 / (1 << 20) as f64
        ));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Doublings, then halvings, of the offered load a goodput search makes per policy.
const GOODPUT_STEPS: (u32, u32) = (8, 7);

/// `--workload`'s requests as the arguments ask for them, arriving at `rate` a second.
fn generate(args: &BenchArgs, kind: WorkloadKind, rate: f64) -> Vec<TraceRequest> {
    kind.workload().generate_bursty(
        args.requests,
        rate,
        args.output_tokens,
        args.seed,
        args.burstiness,
    )
}

/// Open-loop runs of `--trace` or `--workload` at a factor on the load it offers
/// (`--speedup` for a trace, `--rate` for a workload): what goodput searches and sweeps
/// scale.
struct OpenLoad<'a> {
    args: &'a BenchArgs,
    profile: &'a Profile,
    deployment: Deployment,
    trace: Option<Vec<TraceRequest>>,
    /// The mean arrival rate a factor of 1 offers: the workload's, or the trace's over its
    /// span (with --speedup).
    base_rate: f64,
}

impl<'a> OpenLoad<'a> {
    fn new(
        args: &'a BenchArgs,
        profile: &'a Profile,
        deployment: Deployment,
    ) -> anyhow::Result<Self> {
        let trace = match &args.trace {
            Some(path) => Some(load_mooncake(path)?),
            None => None,
        };
        anyhow::ensure!(
            trace.is_some() || args.workload.is_some(),
            "give --trace or --workload"
        );
        anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
        let base_rate = match &trace {
            Some(trace) => {
                let span_s = trace.last().map_or(0, |r| r.timestamp) as f64 / 1000.0;
                anyhow::ensure!(span_s > 0.0, "the trace's arrivals span no time");
                trace.len() as f64 / span_s * args.speedup
            }
            None => args.rate,
        };
        Ok(Self {
            args,
            profile,
            deployment,
            trace,
            base_rate,
        })
    }

    /// `policy`'s run at `factor` times the load, its offered rate noted in the report.
    fn run(&self, policy: Policy, factor: f64) -> PolicyReport {
        let args = self.args;
        let generated: Vec<TraceRequest>;
        let (trace, speedup) = match (&self.trace, args.workload) {
            (Some(trace), _) => (trace.as_slice(), args.speedup * factor),
            (None, Some(kind)) => {
                generated = generate(args, kind, args.rate * factor);
                (generated.as_slice(), args.speedup)
            }
            (None, None) => (&[][..], 1.0),
        };
        let load = Load::Open {
            speedup,
            copies: args.copies,
        };
        let mut report = run_deployed(
            trace,
            self.profile,
            args.pods,
            policy,
            load,
            self.deployment,
        );
        report.offered_requests_per_s = Some(self.base_rate * factor);
        report
    }
}

/// `kvroute bench --goodput-slo-ms`: per policy, the highest offered load (a factor on
/// `--rate` or `--speedup`) whose TTFT p90 is within `slo` ms, and that run's report.
fn run_goodput(
    args: &BenchArgs,
    profile: &Profile,
    policies: &[Policy],
    deployment: Deployment,
    slo: f64,
) -> anyhow::Result<()> {
    let load = OpenLoad::new(args, profile, deployment)?;
    let run_at = |policy: Policy, factor: f64| load.run(policy, factor);
    let mut out = format!(
        "Goodput: the highest offered load with TTFT p90 <= {slo} ms, {} pods of {}\n\n{:<18} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9}\n",
        args.pods,
        profile.name,
        "policy",
        "offered/s",
        "served/s",
        "output tok/s",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "hit rate"
    );
    let mut reports = Vec::new();
    for &policy in policies {
        let good = highest_within(|factor| run_at(policy, factor), |r| r.ttft_p90_ms <= slo);
        match good {
            Some((_, r)) => {
                out.push_str(&format!(
                    "{:<18} {:>10.2} {:>10.2} {:>12.0} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.1}%\n",
                    r.policy,
                    r.offered_requests_per_s.unwrap_or(0.0),
                    r.requests_per_s,
                    r.output_tokens_per_s,
                    r.ttft_p50_ms,
                    r.ttft_p90_ms,
                    r.ttft_p99_ms,
                    100.0 * r.hit_rate
                ));
                reports.push(r);
            }
            None => out.push_str(&format!(
                "{:<18} {:>10}  (TTFT p90 over {slo} ms even at 1/{} of the load)\n",
                policy.name(),
                "-",
                1u32 << GOODPUT_STEPS.0
            )),
        }
    }
    if let Some(path) = &args.json {
        let title = format!("goodput at TTFT p90 <= {slo} ms");
        write_json(path, &title, profile, args.pods, reports)?;
        out.push_str(&format!("json: {}\n", path.display()));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// `kvroute bench --sweep`: every policy at each of `factors` times the offered load, so
/// TTFT can be read against load (the curve a goodput search finds one point of).
fn run_sweep(
    args: &BenchArgs,
    profile: &Profile,
    policies: &[Policy],
    deployment: Deployment,
    factors: &[f64],
) -> anyhow::Result<()> {
    let load = OpenLoad::new(args, profile, deployment)?;
    let mut out = format!(
        "Load sweep, {} pods of {} ({}-token blocks), open loop\n\n{:>10} {:<18} {:>10} {:>10} {:>10} {:>12} {:>9}\n",
        args.pods,
        profile.name,
        profile.block_size,
        "offered/s",
        "policy",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "output tok/s",
        "hit rate"
    );
    let mut reports = Vec::new();
    for &factor in factors {
        for &policy in policies {
            let r = load.run(policy, factor);
            out.push_str(&format!(
                "{:>10.2} {:<18} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>12.0} {:>8.1}%\n",
                r.offered_requests_per_s.unwrap_or(0.0),
                r.policy,
                r.ttft_p50_ms,
                r.ttft_p90_ms,
                r.ttft_p99_ms,
                r.output_tokens_per_s,
                100.0 * r.hit_rate
            ));
            reports.push(r);
        }
    }
    if let Some(path) = &args.json {
        write_json(path, "load sweep", profile, args.pods, reports)?;
        out.push_str(&format!("json: {}\n", path.display()));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// The highest load factor whose run is `ok`, and that run: doubling from 1 while runs are
/// ok (halving while they are not, until one is), then bisecting between the last ok and
/// the first not. `None` if no factor down to 1/2^8 is ok. Assumes more load is never
/// better.
fn highest_within<R>(mut run: impl FnMut(f64) -> R, ok: impl Fn(&R) -> bool) -> Option<(f64, R)> {
    let (up, down) = GOODPUT_STEPS;
    let mut good: Option<(f64, R)> = None;
    let mut bad = None;
    let mut factor = 1.0;
    for _ in 0..up {
        let r = run(factor);
        if ok(&r) {
            good = Some((factor, r));
            factor *= 2.0;
        } else {
            bad = Some(factor);
            if good.is_some() {
                break;
            }
            factor /= 2.0;
        }
    }
    if let (Some(mut hi), Some(mut lo)) = (bad, good.as_ref().map(|(f, _)| *f)) {
        for _ in 0..down {
            let mid = (lo + hi) / 2.0;
            let r = run(mid);
            if ok(&r) {
                lo = mid;
                good = Some((mid, r));
            } else {
                hi = mid;
            }
        }
    }
    good
}

/// Writes `reports` as the versioned JSON document (`--json`).
fn write_json(
    path: &std::path::Path,
    title: &str,
    profile: &Profile,
    pods: usize,
    reports: Vec<PolicyReport>,
) -> anyhow::Result<()> {
    let doc = BenchReport {
        schema: BenchReport::SCHEMA.into(),
        title: title.to_owned(),
        profile: profile.name.into(),
        pods,
        block_size: profile.block_size,
        policies: reports,
    };
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_chart(
    path: &std::path::Path,
    title: &str,
    reports: &[PolicyReport],
) -> anyhow::Result<()> {
    let svg = render_svg(title, reports)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// This process's peak resident memory (Linux `VmHWM`), if the system says.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The comparison table, one policy a row.
fn table(title: &str, reports: &[PolicyReport]) -> String {
    let mut out = format!("{title}\n\n");
    out.push_str(&format!(
        "{:<18} {:>10} {:>10} {:>10} {:>9} {:>12} {:>9} {:>9} {:>10} {:>8}\n",
        "policy",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "TPOT",
        "output tok/s",
        "hit rate",
        "imbalance",
        "decide p99",
        "wall"
    ));
    let agreement = reports.iter().any(|r| r.agreement.is_some());
    if agreement {
        out.insert_str(out.len() - 1, &format!(" {:>7}", "agree"));
    }
    // Shown when a pool ran short of KV cache: tables of runs that never did read as before.
    let preempted = reports.iter().any(|r| r.preemptions > 0);
    if preempted {
        out.insert_str(out.len() - 1, &format!(" {:>9}", "preempted"));
    }
    for r in reports {
        // Policies that do not use kvroute's scheduler have no decision time to show.
        let decide = r
            .decision_p99_us
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}us"));
        out.push_str(&format!(
            "{:<18} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>7.1}ms {:>12.0} {:>8.1}% {:>9.2} {:>10} {:>7.1}s\n",
            r.policy,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.ttft_p99_ms,
            r.tpot_mean_ms,
            r.output_tokens_per_s,
            100.0 * r.hit_rate,
            r.imbalance,
            decide,
            r.wall_s
        ));
        if agreement {
            let agree = r
                .agreement
                .map_or_else(|| "-".to_owned(), |a| format!("{:.1}%", 100.0 * a));
            out.insert_str(out.len() - 1, &format!(" {agree:>7}"));
        }
        if preempted {
            out.insert_str(out.len() - 1, &format!(" {:>9}", r.preemptions));
        }
    }
    out
}

/// Each part's TTFT on a mixed workload, one policy and part a row: which part pays for
/// what the whole mix's percentiles show.
fn parts_table(names: &[&str], reports: &[PolicyReport]) -> String {
    let mut out = format!(
        "\nby part:\n{:<18} {:<15} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
        "policy", "part", "requests", "TTFT p50", "TTFT p90", "TTFT p99", "TTFT mean"
    );
    for r in reports {
        for p in &r.parts {
            out.push_str(&format!(
                "{:<18} {:<15} {:>8} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms\n",
                r.policy,
                names.get(usize::from(p.part)).copied().unwrap_or("?"),
                p.finished,
                p.ttft_p50_ms,
                p.ttft_p90_ms,
                p.ttft_p99_ms,
                p.ttft_mean_ms
            ));
        }
    }
    out
}

/// The shipped Mooncake-format trace (3,993 requests), built into the binary for the demo.
const SHIPPED_TRACE: &str = include_str!("../benches/traces/mooncake_synthetic_trace.jsonl");

/// `kvroute demo`: the shipped trace on 16 simulated pods and a multi-turn chat workload on 8,
/// every policy side by side, and the headline against round robin.
pub(crate) fn run_demo(args: &DemoArgs) -> anyhow::Result<()> {
    let trace: Vec<TraceRequest> = SHIPPED_TRACE
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing the built-in trace")?;
    let profile = Profile::h100_llama31_8b().with_block_size(512);
    let chats = WorkloadKind::MultiTurn
        .workload()
        .generate(4000, 4.0, 128, 1);
    let runs = [
        (
            "kvroute-demo-trace.svg",
            "The shipped Mooncake trace (3,993 requests), 128 users (closed loop), 16 pods",
            &trace,
            16,
            Load::Closed {
                users: 128,
                think_ms: 0,
                copies: 1,
            },
        ),
        (
            "kvroute-demo-chat.svg",
            "Multi-turn chat (64 users, growing histories), closed loop, 8 pods",
            &chats,
            8,
            Load::Closed {
                users: 64,
                think_ms: 0,
                copies: 1,
            },
        ),
    ];
    let mut out = String::new();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (file, title, workload, pods, load) in runs {
        let reports: Vec<PolicyReport> = Policy::ALL
            .into_iter()
            .map(|p| run(workload, &profile, pods, p, load))
            .collect();
        out.push_str(&table(title, &reports));
        let chart = args.out.join(file);
        write_chart(&chart, title, &reports)?;
        out.push_str(&format!("chart: {}\n", chart.display()));
        let by = |name: &str| reports.iter().find(|r| r.policy == name);
        if let (Some(rr), Some(kv)) = (by("round-robin"), by("kvroute")) {
            out.push_str(&format!(
                "kvroute vs round-robin: TTFT p50 {:.1}x lower, output tokens/s {:.2}x, prefix-cache hit rate {:.1}% vs {:.1}%\n\n",
                rr.ttft_p50_ms / kv.ttft_p50_ms,
                kv.output_tokens_per_s / rr.output_tokens_per_s,
                100.0 * kv.hit_rate,
                100.0 * rr.hit_rate,
            ));
        }
    }
    out.push_str("Simulated h100-llama3.1-8b pods in virtual time (docs/simulator.md); more in docs/benchmarks.md.\n");
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goodput_search_finds_the_edge_of_the_slo() {
        // Above 1: doubles to 4 (too much), then bisects within 3 % of 3.3.
        let (f, r) = highest_within(|f| f, |&f| f <= 3.3).unwrap();
        assert_eq!(f, r);
        assert!((3.2..=3.3).contains(&f), "{f}");
        // Below 1: halves until within, then bisects.
        let (f, _) = highest_within(|f| f, |&f| f <= 0.3).unwrap();
        assert!((0.29..=0.3).contains(&f), "{f}");
        // Never within.
        assert!(highest_within(|f| f, |_| false).is_none());
        // Within at every load tried: the last doubling.
        assert_eq!(highest_within(|f| f, |_| true).map(|(f, _)| f), Some(128.0));
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn bench(args: &[&str]) -> anyhow::Result<()> {
        use clap::Parser;
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        run_bench(&cli.bench)
    }

    /// Goodput is the arrival rate offered in the run kept: with an SLO every load meets,
    /// the last doubling's (128 times `--rate`), which what finished over the run (drain
    /// included) falls short of.
    #[test]
    fn goodput_reports_the_rate_offered() {
        let path =
            std::env::temp_dir().join(format!("kvroute-goodput-{}.json", std::process::id()));
        bench(&[
            "--workload",
            "shared-prompts",
            "--requests",
            "200",
            "--pods",
            "2",
            "--rate",
            "0.5",
            "--policies",
            "round-robin",
            "--goodput-slo-ms",
            "1000000",
            "--json",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let r = &doc["policies"][0];
        assert_eq!(r["offered_requests_per_s"].as_f64(), Some(64.0), "{r}");
        let served = r["requests_per_s"].as_f64().unwrap();
        assert!(served > 0.0 && served < 64.0, "{served}");
    }

    /// A sweep runs every policy at every load asked for, each report with the rate it
    /// offered, in load order; more load never lowers what the pool serves here.
    #[test]
    fn a_sweep_runs_every_policy_at_every_load() {
        let path = std::env::temp_dir().join(format!("kvroute-sweep-{}.json", std::process::id()));
        bench(&[
            "--workload",
            "multi-turn",
            "--requests",
            "300",
            "--pods",
            "2",
            "--rate",
            "4",
            "--policies",
            "round-robin,kvroute-approx",
            "--sweep",
            "0.5,1,2",
            "--json",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let doc: BenchReport =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let runs: Vec<(f64, &str)> = doc
            .policies
            .iter()
            .map(|r| (r.offered_requests_per_s.unwrap(), r.policy.as_str()))
            .collect();
        assert_eq!(
            runs,
            [
                (2.0, "round-robin"),
                (2.0, "kvroute-approx"),
                (4.0, "round-robin"),
                (4.0, "kvroute-approx"),
                (8.0, "round-robin"),
                (8.0, "kvroute-approx"),
            ]
        );
        let served: Vec<f64> = doc
            .policies
            .iter()
            .filter(|r| r.policy == "kvroute-approx")
            .map(|r| r.requests_per_s)
            .collect();
        assert!(served.windows(2).all(|w| w[0] < w[1]), "{served:?}");
    }

    #[test]
    fn sweep_factors_must_be_positive() {
        for bad in ["0", "-1,1", "NaN", "1,inf"] {
            let arg = format!("--sweep={bad}");
            let err = bench(&["--workload", "doc-qa", "--requests", "10", &arg]).unwrap_err();
            assert!(err.to_string().contains("--sweep"), "{bad}: {err}");
        }
    }

    #[test]
    fn burstiness_must_be_positive() {
        for bad in ["0", "-1", "NaN"] {
            let arg = format!("--burstiness={bad}");
            let err = bench(&["--workload", "doc-qa", "--requests", "10", &arg]).unwrap_err();
            assert!(err.to_string().contains("--burstiness"), "{bad}: {err}");
            // The goodput search too, before it runs anything.
            let err = bench(&[
                "--workload",
                "doc-qa",
                "--requests",
                "10",
                "--goodput-slo-ms",
                "1000",
                &arg,
            ])
            .unwrap_err();
            assert!(err.to_string().contains("--burstiness"), "{bad}: {err}");
        }
        bench(&[
            "--workload",
            "doc-qa",
            "--requests",
            "20",
            "--pods",
            "2",
            "--burstiness",
            "0.25",
            "--policies",
            "round-robin",
        ])
        .unwrap();
    }

    /// The LoRA workload names adapters, so the pods must have slots for them.
    #[test]
    fn the_lora_workload_needs_adapter_slots() {
        let err = bench(&["--workload", "lora", "--requests", "20"]).unwrap_err();
        assert!(err.to_string().contains("--max-loras"), "{err}");
        bench(&[
            "--workload",
            "lora",
            "--requests",
            "20",
            "--pods",
            "2",
            "--max-loras",
            "1",
            "--cpu-offload-tokens",
            "100000",
            "--policies",
            "round-robin,kvroute-lora",
        ])
        .unwrap();
    }

    /// The preemption column appears when some policy's pods preempted, with each
    /// policy's count, and stays out of tables where none did.
    #[test]
    fn the_table_shows_preemptions_only_where_there_were_some() {
        let profile = Profile::named("h100-llama3.1-8b").unwrap();
        let run = |policy, pods, rate| {
            run_deployed(
                &WorkloadKind::LongChats
                    .workload()
                    .generate(300, rate, 128, 1),
                &profile,
                pods,
                policy,
                Load::Open {
                    speedup: 1.0,
                    copies: 1,
                },
                Deployment::default(),
            )
        };
        let calm = [run(Policy::RoundRobin, 8, 1.0)];
        assert!(
            !table("t", &calm).contains("preempted"),
            "{}",
            table("t", &calm)
        );
        let squeezed = [
            run(Policy::RoundRobin, 1, 20.0),
            run(Policy::KvrouteApprox, 8, 1.0),
        ];
        assert!(squeezed[0].preemptions > 0, "{squeezed:?}");
        let t = table("t", &squeezed);
        let header = t.lines().nth(2).unwrap();
        assert!(header.ends_with("preempted"), "{t}");
        let row = t.lines().nth(3).unwrap();
        assert!(
            row.ends_with(&format!(" {}", squeezed[0].preemptions)),
            "{t}"
        );
    }

    /// `--workload mixed` is the four parts its help names, and its table gives each
    /// part's row under each policy.
    #[test]
    fn the_mixed_workload_is_tabled_by_part() {
        let Workload::Mixed(parts) = WorkloadKind::Mixed.workload() else {
            panic!("not mixed");
        };
        let names: Vec<&str> = parts.iter().map(|(w, _)| w.name()).collect();
        assert_eq!(
            names,
            [
                "multi-turn",
                "shared-prompts",
                "sibling-bursts",
                "long-revisits"
            ]
        );
        let shares: Vec<f64> = parts.iter().map(|&(_, s)| s).collect();
        assert_eq!(shares, [0.4, 0.3, 0.2, 0.1]);
        let report = run_deployed(
            &WorkloadKind::Mixed.workload().generate(400, 8.0, 16, 1),
            &Profile::named("h100-llama3.1-8b").unwrap(),
            4,
            Policy::RoundRobin,
            Load::Open {
                speedup: 1.0,
                copies: 1,
            },
            Deployment::default(),
        );
        let t = parts_table(&names, &[report]);
        for name in names {
            assert!(
                t.lines()
                    .any(|l| l.starts_with("round-robin") && l.contains(name)),
                "{t}"
            );
        }
    }

    #[test]
    fn the_built_in_trace_is_the_shipped_one() {
        let n = SHIPPED_TRACE
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        assert_eq!(n, 3993);
        let first: TraceRequest =
            serde_json::from_str(SHIPPED_TRACE.lines().next().unwrap_or_default()).unwrap();
        assert_eq!(first.input_length, 40160);
    }
}
