//! Pickers: which scored candidates route the request.

use crate::framework::TIE;
use crate::{Picker, Plugin};

/// The highest total wins (`max-score-picker`); up to `max_endpoints` are returned, best
/// first. Totals within float noise tie, and ties go to a start position that rotates by
/// one per request, so equal endpoints take turns; the same calls give the same choices.
#[derive(Debug)]
pub(crate) struct MaxScorePicker {
    max_endpoints: usize,
}

impl MaxScorePicker {
    pub(crate) fn new(max_endpoints: usize) -> Self {
        Self {
            max_endpoints: max_endpoints.max(1),
        }
    }
}

impl Plugin for MaxScorePicker {
    fn type_name(&self) -> &'static str {
        "max-score-picker"
    }

    fn picker(&self) -> Option<&dyn Picker> {
        Some(self)
    }
}

impl Picker for MaxScorePicker {
    fn pick(&self, totals: &[f64], turn: u64, out: &mut Vec<usize>) {
        let n = totals.len();
        if n == 0 {
            return;
        }
        let start = (turn % n as u64) as usize;
        // Totals compared at a resolution of TIE; equal keys go by their distance from the
        // rotating start. `+ 0.0` makes a rounded -0.0 equal to 0.0. A selection pass per
        // endpoint returned: O(k·n) without allocating, and k is 1 unless fallbacks are asked.
        // The best so far is kept with its key, so each candidate's key is made once a pass.
        for _ in 0..self.max_endpoints.min(n) {
            let mut best: Option<(f64, usize, usize)> = None;
            for i in (0..n).filter(|i| !out.contains(i)) {
                let k = (totals[i] / TIE).round() + 0.0;
                let d = if i >= start { i - start } else { i + n - start };
                let better = best.is_none_or(|(bk, bd, _)| {
                    k.total_cmp(&bk).then(bd.cmp(&d)) == std::cmp::Ordering::Greater
                });
                if better {
                    best = Some((k, d, i));
                }
            }
            match best {
                Some((_, _, b)) => out.push(b),
                None => break,
            }
        }
    }
}

/// A uniformly random choice (`random-picker`), seeded per request from the request counter
/// so runs repeat.
#[derive(Debug)]
pub(crate) struct RandomPicker {
    max_endpoints: usize,
}

impl RandomPicker {
    pub(crate) fn new(max_endpoints: usize) -> Self {
        Self {
            max_endpoints: max_endpoints.max(1),
        }
    }
}

impl Plugin for RandomPicker {
    fn type_name(&self) -> &'static str {
        "random-picker"
    }

    fn picker(&self) -> Option<&dyn Picker> {
        Some(self)
    }
}

impl Picker for RandomPicker {
    fn pick(&self, totals: &[f64], turn: u64, out: &mut Vec<usize>) {
        weighted_sample(totals.len(), |_| 1.0, turn, self.max_endpoints, out);
    }
}

/// A random choice in proportion to each candidate's total (`weighted-random-picker`),
/// without replacement for fallbacks (A-Res: the largest `u^(1/w)` keys win). All totals
/// zero: uniform.
#[derive(Debug)]
pub(crate) struct WeightedRandomPicker {
    max_endpoints: usize,
}

impl WeightedRandomPicker {
    pub(crate) fn new(max_endpoints: usize) -> Self {
        Self {
            max_endpoints: max_endpoints.max(1),
        }
    }
}

impl Plugin for WeightedRandomPicker {
    fn type_name(&self) -> &'static str {
        "weighted-random-picker"
    }

    fn picker(&self) -> Option<&dyn Picker> {
        Some(self)
    }
}

impl Picker for WeightedRandomPicker {
    fn pick(&self, totals: &[f64], turn: u64, out: &mut Vec<usize>) {
        if totals.iter().all(|&t| t <= 0.0) {
            weighted_sample(totals.len(), |_| 1.0, turn, self.max_endpoints, out);
        } else {
            weighted_sample(totals.len(), |i| totals[i], turn, self.max_endpoints, out);
        }
    }
}

/// Up to `k` of `n` items drawn without replacement with probability proportional to
/// `weight` (A-Res); items of weight 0 only when nothing else is left.
fn weighted_sample(
    n: usize,
    weight: impl Fn(usize) -> f64,
    turn: u64,
    k: usize,
    out: &mut Vec<usize>,
) {
    let mut seed = splitmix64(turn ^ 0x6a09_e667_f3bc_c909);
    let key = |i: usize, seed: &mut u64| {
        *seed = splitmix64(*seed ^ i as u64);
        // u in (0, 1].
        let u = ((*seed >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let w = weight(i);
        if w > 0.0 {
            u.ln() / w
        } else {
            f64::NEG_INFINITY
        }
    };
    for _ in 0..k.min(n) {
        let mut best: Option<(f64, usize)> = None;
        let mut s = seed;
        for i in 0..n {
            let k = key(i, &mut s);
            if out.contains(&i) {
                continue;
            }
            if best.is_none_or(|(bk, _)| k > bk) {
                best = Some((k, i));
            }
        }
        match best {
            Some((_, i)) => out.push(i),
            None => break,
        }
        seed = s;
    }
}

/// A 64-bit mix (SplitMix64's finaliser): good enough spread for picking.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn max_score_returns_the_best_then_fallbacks_and_rotates_ties() {
        let mut out = Vec::new();
        MaxScorePicker::new(3).pick(&[0.1, 0.3, 0.2], 0, &mut out);
        assert_eq!(out, [1, 2, 0]);
        let firsts: Vec<usize> = (0..3)
            .map(|turn| {
                let mut out = Vec::new();
                MaxScorePicker::new(1).pick(&[0.5, 0.5, 0.5], turn, &mut out);
                out[0]
            })
            .collect();
        assert_eq!(firsts, [0, 1, 2], "ties take turns");
    }

    proptest! {
        /// The picks are the candidates in order of total (at the TIE resolution, NaN
        /// above all as `total_cmp` has it), equal totals by distance from the rotating
        /// start: as a full sort would give them.
        #[test]
        fn max_score_picks_as_a_sort_would(
            totals in proptest::collection::vec(
                prop_oneof![
                    (0u8..4).prop_map(|v| f64::from(v) / 4.0),
                    -1.0f64..1.0,
                    Just(f64::NAN),
                ],
                1..12,
            ),
            turn in 0u64..50,
            k in 1usize..5,
        ) {
            let n = totals.len();
            let start = (turn % n as u64) as usize;
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                let key = |i: usize| ((totals[i] / TIE).round() + 0.0, (i + n - start) % n);
                let ((ka, da), (kb, db)) = (key(a), key(b));
                kb.total_cmp(&ka).then(da.cmp(&db))
            });
            order.truncate(k);
            let mut out = Vec::new();
            MaxScorePicker::new(k).pick(&totals, turn, &mut out);
            prop_assert_eq!(out, order);
        }
    }

    #[test]
    fn weighted_random_follows_the_weights() {
        let picker = WeightedRandomPicker::new(1);
        let mut counts = [0usize; 3];
        for turn in 0..30_000 {
            let mut out = Vec::new();
            picker.pick(&[1.0, 3.0, 0.0], turn, &mut out);
            counts[out[0]] += 1;
        }
        assert_eq!(
            counts[2], 0,
            "weight 0 is never drawn while others are left"
        );
        let share = counts[1] as f64 / 30_000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
        let mut out = Vec::new();
        WeightedRandomPicker::new(3).pick(&[1.0, 3.0, 0.0], 7, &mut out);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "without replacement: {out:?}");
    }

    #[test]
    fn random_spreads_evenly() {
        let picker = RandomPicker::new(1);
        let mut counts = [0usize; 4];
        for turn in 0..40_000 {
            let mut out = Vec::new();
            picker.pick(&[0.0, 9.0, 0.0, 0.0], turn, &mut out);
            counts[out[0]] += 1;
        }
        for c in counts {
            assert!((c as f64 / 10_000.0 - 1.0).abs() < 0.05, "{counts:?}");
        }
    }
}
