//! The comparison chart: each policy's TTFT CDF and its output throughput, as an SVG.

use plotters::prelude::*;

use crate::report::PolicyReport;

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing the chart: {0}")]
pub struct ChartError(String);

fn err(e: impl std::fmt::Display) -> ChartError {
    ChartError(e.to_string())
}

/// One color per policy, in report order (Tableau 10, readable on white).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// An SVG with two panels: left, the CDF of time to first token per policy (seconds, up to
/// the largest p99, so the tails show); right, output tokens per second per policy.
pub fn render_svg(title: &str, reports: &[PolicyReport]) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(err)?;
        let (left, right) = root.split_horizontally(700);

        let x_max = reports
            .iter()
            .map(|r| r.ttft_p99_ms / 1000.0)
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.05;
        let mut cdf = ChartBuilder::on(&left)
            .caption("TTFT CDF", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(err)?;
        cdf.configure_mesh()
            .x_desc("time to first token (s)")
            .y_desc("fraction of requests")
            .draw()
            .map_err(err)?;
        for (i, r) in reports.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points = r
                .ttft_cdf_ms
                .iter()
                .enumerate()
                .map(|(p, &ms)| (ms / 1000.0, p as f64 / 100.0));
            cdf.draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(err)?
                .label(r.policy.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        cdf.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;

        let n = reports.len().max(1);
        let tok_max = reports
            .iter()
            .map(|r| r.output_tokens_per_s)
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.1;
        let names: Vec<String> = reports.iter().map(|r| r.policy.clone()).collect();
        let mut bars = ChartBuilder::on(&right)
            .caption("output tokens/s", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(140)
            .build_cartesian_2d(0.0..tok_max, (0..n).into_segmented())
            .map_err(err)?;
        bars.configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| match y {
                // First policy on top.
                SegmentValue::CenterOf(i) => names
                    .get(n.wrapping_sub(1).wrapping_sub(*i))
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("tokens/s (simulated)")
            .draw()
            .map_err(err)?;
        bars.draw_series(reports.iter().enumerate().map(|(i, r)| {
            let row = n - 1 - i;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (r.output_tokens_per_s, SegmentValue::Exact(row + 1)),
                ],
                COLORS[i % COLORS.len()].filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        }))
        .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Load, Policy, TraceRequest, run};

    #[test]
    fn every_policy_is_drawn_and_named() {
        let trace: Vec<TraceRequest> = (0..40u64)
            .map(|i| TraceRequest {
                timestamp: i * 100,
                input_length: 1024,
                output_length: 8,
                hash_ids: vec![i % 4, 100 + i],
                adapter: None,
                part: None,
            })
            .collect();
        let profile = kvroute_sim::Profile::h100_llama31_8b().with_block_size(512);
        let load = Load::Open {
            speedup: 1.0,
            copies: 1,
        };
        let reports: Vec<PolicyReport> = [Policy::RoundRobin, Policy::Kvroute]
            .into_iter()
            .map(|p| run(&trace, &profile, 2, p, load))
            .collect();
        let svg = render_svg("two policies", &reports).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for name in ["two policies", "round-robin", "kvroute", "TTFT CDF"] {
            assert!(svg.contains(name), "{name} missing");
        }
        // Each policy's line (and legend mark, and bar) in its own color.
        for color in ["#1F77B4", "#FF7F0E"] {
            assert!(svg.matches(color).count() >= 3, "{color}");
        }
    }
}
