//! Reading percentiles out of the kernel's log-linear latency histogram.

use membarrier_trace_common::{HIST_BUCKETS, hist_bucket, hist_bucket_lower, hist_bucket_upper};
use serde::{Deserialize, Serialize};

/// One non-empty bucket, as the outputs show it.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Bucket {
    /// Inclusive upper bound of the bucket.
    pub le_ns: u64,
    pub count: u64,
}

/// A latency histogram in the kernel's buckets, kept sparse: a process that made two calls
/// holds two buckets, not [`HIST_BUCKETS`] (the tracer keeps a thousand exited processes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// (bucket index, calls), ascending by index, no zero counts.
    nonzero: Vec<(u16, u64)>,
}

impl Histogram {
    /// A histogram from the kernel's dense array (`counts[i]` calls in bucket `i`).
    pub fn from_counts(counts: &[u64]) -> Self {
        Self {
            nonzero: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as u16, c))
                .collect(),
        }
    }

    /// Adds `n` calls to bucket `i`.
    pub fn add_to(&mut self, i: usize, n: u64) {
        if n == 0 {
            return;
        }
        let i = i.min(HIST_BUCKETS - 1) as u16;
        match self.nonzero.binary_search_by_key(&i, |b| b.0) {
            Ok(at) => self.nonzero[at].1 += n,
            Err(at) => self.nonzero.insert(at, (i, n)),
        }
    }

    pub fn add(&mut self, other: &Histogram) {
        if self.nonzero.is_empty() {
            self.nonzero.clone_from(&other.nonzero);
            return;
        }
        for &(i, n) in &other.nonzero {
            self.add_to(usize::from(i), n);
        }
    }

    /// Records one value (userspace side; the kernel does the same in the eBPF program).
    pub fn record(&mut self, ns: u64) {
        self.add_to(hist_bucket(ns), 1);
    }

    pub fn total(&self) -> u64 {
        self.nonzero.iter().map(|b| b.1).sum()
    }

    /// The `q` quantile (0 < q <= 1) by nearest rank: the middle of the bucket holding the
    /// ceil(q * n)-th smallest value, clamped to the observed [min, max]. Since a bucket is at
    /// most 1/16 of its lower bound wide, the result is within 1/32 of the true value.
    pub fn quantile(&self, q: f64, min: u64, max: u64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for &(i, c) in &self.nonzero {
            seen += c;
            if seen >= rank {
                let i = usize::from(i);
                let (lo, hi) = (hist_bucket_lower(i), hist_bucket_upper(i));
                return (lo + (hi - lo) / 2).clamp(min, max);
            }
        }
        max
    }

    /// The calls in `self` that are not in `before` (an earlier reading of the same totals):
    /// bucket by bucket, never below zero.
    pub fn minus(&self, before: &Histogram) -> Histogram {
        let mut was = before.nonzero.iter().peekable();
        let mut out = Vec::new();
        for &(i, n) in &self.nonzero {
            while was.next_if(|b| b.0 < i).is_some() {}
            let had = was.next_if(|b| b.0 == i).map_or(0, |b| b.1);
            if n > had {
                out.push((i, n - had));
            }
        }
        Histogram { nonzero: out }
    }

    /// The lowest and highest values its calls can have been: the lower edge of the first
    /// non-empty bucket and the upper edge of the last (None when empty).
    pub fn range(&self) -> Option<(u64, u64)> {
        let first = usize::from(self.nonzero.first()?.0);
        let last = usize::from(self.nonzero.last()?.0);
        Some((hist_bucket_lower(first), hist_bucket_upper(last)))
    }

    /// Non-empty buckets. The last bucket is open-ended; its bound is raised to `max` when
    /// values above the nominal bound fell in it.
    pub fn buckets(&self, max: u64) -> Vec<Bucket> {
        self.nonzero
            .iter()
            .map(|&(i, count)| {
                let i = usize::from(i);
                let le = hist_bucket_upper(i);
                Bucket {
                    le_ns: if i + 1 == HIST_BUCKETS {
                        le.max(max)
                    } else {
                        le
                    },
                    count,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), to avoid a dependency for test data.
    fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn minus_undoes_add() {
        let mut a = Histogram::default();
        [5, 100, 100, 7_000].into_iter().for_each(|v| a.record(v));
        let before = a.clone();
        let mut d = Histogram::default();
        [3, 100, 9_000_000].into_iter().for_each(|v| d.record(v));
        a.add(&d);
        assert_eq!(a.minus(&before), d);
        let mut back = before.clone();
        back.add(&a.minus(&before));
        assert_eq!(back, a);
        assert_eq!(a.minus(&a), Histogram::default());
        assert_eq!(
            d.range(),
            Some((3, hist_bucket_upper(hist_bucket(9_000_000))))
        );
        assert_eq!(Histogram::default().range(), None);
    }

    #[test]
    fn buckets_tile_the_range() {
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(15), 15);
        assert_eq!(hist_bucket(16), 16);
        for i in 0..HIST_BUCKETS - 1 {
            assert_eq!(
                hist_bucket_upper(i) + 1,
                hist_bucket_lower(i + 1),
                "bucket {i}"
            );
            assert_eq!(hist_bucket(hist_bucket_lower(i)), i);
            assert_eq!(hist_bucket(hist_bucket_upper(i)), i);
        }
        // 16 buckets per power of two from 16 ns up to the 34 s bound.
        assert_eq!(hist_bucket(1 << 20) - hist_bucket(1 << 19), 16);
        assert_eq!(hist_bucket_upper(HIST_BUCKETS - 1), (1 << 35) - 1);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert!(
            hist_bucket(10_000_000_000) < HIST_BUCKETS - 1,
            "10 s fits below the last"
        );
    }

    #[test]
    fn bucket_width_is_at_most_a_sixteenth() {
        for i in 16..HIST_BUCKETS {
            let (lo, hi) = (hist_bucket_lower(i), hist_bucket_upper(i));
            assert!((hi - lo + 1) * 16 <= lo, "bucket {i}: {lo}..={hi}");
        }
    }

    #[test]
    fn quantiles_within_five_percent_of_exact() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        // Several shapes: uniform over decades, a tight cluster, and bimodal.
        let shapes: [&dyn Fn(u64) -> u64; 3] =
            [&|r| 100 + r % 10_000_000_000, &|r| 400 + r % 50, &|r| {
                if r % 10 == 0 {
                    12_000_000 + r % 9_000_000
                } else {
                    450 + r % 4_000
                }
            }];
        for shape in shapes {
            let mut values: Vec<u64> = (0..20_000).map(|_| shape(xorshift(&mut seed))).collect();
            let mut h = Histogram::default();
            values.iter().for_each(|&v| h.record(v));
            values.sort_unstable();
            let (min, max) = (values[0], *values.last().unwrap());
            for q in [0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
                let rank = ((q * values.len() as f64).ceil() as usize).max(1);
                let exact = values[rank - 1] as f64;
                let got = h.quantile(q, min, max) as f64;
                let err = (got - exact).abs() / exact;
                assert!(err <= 0.05, "q={q}: exact {exact}, got {got}, err {err:.4}");
                assert!(err <= 1.0 / 32.0 + 1e-9, "q={q}: err {err:.4} above 1/32");
            }
        }
    }

    #[test]
    fn quantile_of_empty_and_single() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5, 0, 0), 0);
        let mut h = Histogram::default();
        h.record(12_345_678);
        assert_eq!(h.quantile(0.5, 12_345_678, 12_345_678), 12_345_678);
        assert_eq!(h.quantile(0.99, 12_345_678, 12_345_678), 12_345_678);
    }

    #[test]
    fn sparse_merge_matches_dense() {
        let mut seed = 7u64;
        let mut dense = vec![0u64; HIST_BUCKETS];
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for n in 0..5000 {
            let v = xorshift(&mut seed) % 1_000_000_000;
            dense[hist_bucket(v)] += 1;
            if n % 3 == 0 { a.record(v) } else { b.record(v) }
        }
        a.add(&b);
        assert_eq!(a, Histogram::from_counts(&dense));
        assert_eq!(a.total(), 5000);
        a.add_to(0, 0);
        assert_eq!(
            a,
            Histogram::from_counts(&dense),
            "a zero add keeps no empty bucket"
        );
    }

    #[test]
    fn sparse_buckets_with_open_last() {
        let mut h = Histogram::default();
        h.record(5);
        h.record(40_000_000_000);
        assert_eq!(
            h.buckets(40_000_000_000),
            vec![
                Bucket { le_ns: 5, count: 1 },
                Bucket {
                    le_ns: 40_000_000_000,
                    count: 1
                }
            ]
        );
    }
}
