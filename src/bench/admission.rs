//! `kvroute bench --sheddable-share`: goodput under overload with and without admission.

use kvroute_bench::{AdmissionReport, Deployment, Policy, TraceRequest, run_admission};
use kvroute_scheduler::admission::UtilizationDetector;
use kvroute_sim::Profile;

use super::BenchArgs;

/// Runs each policy without and with admission on `trace`, a `share` of it sheddable, and
/// prints one row per run.
pub(super) fn run(
    args: &BenchArgs,
    trace: &[TraceRequest],
    profile: &Profile,
    policies: &[Policy],
    deployment: Deployment,
    share: f64,
) -> anyhow::Result<()> {
    check(share, args.ttft_slo_ms)?;
    let mut out = format!(
        "Goodput under overload: {} requests x{} on {} pods of {}, open loop, speedup {}, {:.0}% sheddable, good = TTFT <= {} ms\n\n{:<18} {:>9} {:>16} {:>13} {:>16} {:>13} {:>14} {:>16}\n",
        trace.len(),
        args.copies,
        args.pods,
        profile.name,
        args.speedup,
        100.0 * share,
        args.ttft_slo_ms,
        "policy",
        "admission",
        "critical good",
        "critical p90",
        "sheddable good",
        "sheddable shed",
        "goodput req/s",
        "critical req/s",
    );
    for &policy in policies {
        for detector in [None, Some(UtilizationDetector::default())] {
            let r = run_admission(
                trace,
                profile,
                args.pods,
                policy,
                (args.speedup, args.copies),
                deployment,
                share,
                detector,
                args.ttft_slo_ms,
            );
            out.push_str(&row(&r));
        }
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Refuses a share outside [0, 1] and an SLO that is not a positive number.
fn check(share: f64, slo_ms: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&share),
        "--sheddable-share must be in [0, 1]"
    );
    anyhow::ensure!(slo_ms > 0.0, "--ttft-slo-ms must be positive");
    Ok(())
}

fn row(r: &AdmissionReport) -> String {
    format!(
        "{:<18} {:>9} {:>16} {:>11.0}ms {:>16} {:>14} {:>14.2} {:>16.2}\n",
        r.policy,
        if r.admission { "on" } else { "off" },
        format!("{}/{}", r.critical.within_slo, r.critical.sent),
        r.critical.ttft_p90_ms,
        format!("{}/{}", r.sheddable.within_slo, r.sheddable.sent),
        r.sheddable.shed,
        r.goodput_rps,
        r.critical_goodput_rps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_or_slo_out_of_range_is_refused() {
        assert!(check(0.5, 1000.0).is_ok());
        assert!(check(0.0, 1.0).is_ok() && check(1.0, 1.0).is_ok());
        for (share, slo) in [
            (1.5, 1000.0),
            (-0.1, 1000.0),
            (f64::NAN, 1000.0),
            (0.5, 0.0),
            (0.5, f64::NAN),
        ] {
            assert!(check(share, slo).is_err(), "{share} {slo}");
        }
    }
}
