//! Summary statistics over latency and throughput samples.

use serde::Serialize;

/// Percentile of an ascending-sorted slice with linear interpolation between closest ranks
/// (numpy's default `method="linear"`). `p` is in [0, 100]. None for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Count, mean, extremes and the percentiles benchmarks usually quote.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summary of `values`; NaN and infinite values are ignored. All zeros when empty.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        // Population standard deviation (numpy's default ddof=0).
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        let pct = |p| percentile(&v, p).unwrap_or(0.0);
        Self {
            count: v.len(),
            mean,
            std: var.sqrt(),
            min: v[0],
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: v[v.len() - 1],
        }
    }
}

/// Fixed-width histogram; `edges` has one more element than `counts`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// `bins` equal bins over [lo, hi]. Bins are half-open except the last, which includes `hi`
    /// (numpy.histogram's convention); values outside the range are not counted.
    pub fn new(values: &[f64], bins: usize, lo: f64, hi: f64) -> Self {
        let bins = bins.max(1);
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let width = (hi - lo) / bins as f64;
        let edges = (0..=bins).map(|i| lo + width * i as f64).collect();
        let mut counts = vec![0u64; bins];
        for &x in values {
            if !x.is_finite() || x < lo || x > hi {
                continue;
            }
            let i = (((x - lo) / width) as usize).min(bins - 1);
            counts[i] += 1;
        }
        Self { edges, counts }
    }

    /// Histogram over the samples' own range, clipped above at `clip_pct` so a few stragglers do
    /// not squash the distribution into one bar.
    pub fn auto(values: &[f64], bins: usize, clip_pct: f64) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let lo = v.first().copied().unwrap_or(0.0).min(0.0);
        let hi = percentile(&v, clip_pct).unwrap_or(1.0);
        Self::new(&v, bins, lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values computed with numpy 2.x:
    //   np.percentile([15, 20, 35, 40, 50], [0, 25, 50, 90, 99, 100]) and np.std(...)
    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        let want = [
            (0.0, 15.0),
            (25.0, 20.0),
            (50.0, 35.0),
            (90.0, 46.0),
            (99.0, 49.6),
            (100.0, 50.0),
        ];
        for (p, w) in want {
            let got = percentile(&v, p).unwrap();
            assert!((got - w).abs() < 1e-9, "p{p}: {got} vs {w}");
        }
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
    }

    #[test]
    fn summary_sorts_and_ignores_non_finite() {
        let s = Summary::of([50.0, 15.0, f64::NAN, 40.0, 20.0, f64::INFINITY, 35.0]);
        assert_eq!(s.count, 5);
        assert!((s.mean - 32.0).abs() < 1e-12);
        // np.std([15, 20, 35, 40, 50]) = 12.884098726725126
        assert!((s.std - 12.884098726725126).abs() < 1e-9);
        assert_eq!((s.min, s.p50, s.max), (15.0, 35.0, 50.0));
        assert!((s.p90 - 46.0).abs() < 1e-9);
        assert_eq!(Summary::of([]), Summary::default());
    }

    // np.histogram([0, 0.5, 1, 1.5, 2, 2.5, 3, 3, 7], bins=3, range=(0, 3))
    //   -> counts [2, 2, 4], edges [0, 1, 2, 3]
    #[test]
    fn histogram_matches_numpy_edges_and_last_bin_inclusive() {
        let v = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 7.0];
        let h = Histogram::new(&v, 3, 0.0, 3.0);
        assert_eq!(h.edges, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(h.counts, vec![2, 2, 4]);
    }

    #[test]
    fn histogram_auto_clips_outliers() {
        let mut v: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        v.push(1000.0);
        let h = Histogram::auto(&v, 10, 99.0);
        assert!(*h.edges.last().unwrap() < 2.0);
        assert_eq!(h.counts.iter().sum::<u64>(), 100);
        // Degenerate range still yields a usable histogram.
        let h = Histogram::auto(&[0.0, 0.0], 4, 99.0);
        assert_eq!(h.counts.iter().sum::<u64>(), 2);
    }
}
