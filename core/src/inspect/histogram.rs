//! Fixed-width histograms over a fixed range, so that histograms of different configurations
//! share their bins and can be overlaid.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// `counts[i]` values fell in `[lo + i·w, lo + (i+1)·w)` with `w = (hi - lo) / counts.len()`;
/// the last bin also holds `hi`. Values outside `[lo, hi]` are counted in `outside`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
    pub outside: u64,
}

impl Histogram {
    /// `bins` empty bins over `[lo, hi]`. A degenerate range (every value equal) is widened to
    /// `[lo - 1, lo + 1]` (or `[lo, lo + 1]` when `lo` is 0 and the data are non-negative),
    /// so the bins keep a width.
    pub fn empty(lo: f64, hi: f64, bins: usize) -> Histogram {
        let bins = bins.max(1);
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else if lo == 0.0 {
            (0.0, 1.0)
        } else {
            (lo - 1.0, lo + 1.0)
        };
        Histogram {
            lo,
            hi,
            counts: vec![0; bins],
            outside: 0,
        }
    }

    /// The histogram of `values` over `[lo, hi]` (see [`Histogram::empty`]), filled in parallel.
    pub fn of(values: &[f64], lo: f64, hi: f64, bins: usize) -> Histogram {
        Self::fill(values.len(), lo, hi, bins, |i| values[i])
    }

    /// The histogram of `value(i)` for `i` in `0..len`.
    pub(crate) fn fill(
        len: usize,
        lo: f64,
        hi: f64,
        bins: usize,
        value: impl Fn(usize) -> f64 + Sync,
    ) -> Histogram {
        let empty = Histogram::empty(lo, hi, bins);
        (0..len)
            .into_par_iter()
            .with_min_len(1 << 14)
            .fold(
                || empty.clone(),
                |mut h, i| {
                    h.add(value(i));
                    h
                },
            )
            .reduce(|| empty.clone(), Histogram::merged)
    }

    pub fn bin_width(&self) -> f64 {
        (self.hi - self.lo) / self.counts.len() as f64
    }

    /// The `len() + 1` bin edges.
    pub fn edges(&self) -> Vec<f64> {
        (0..=self.counts.len())
            .map(|i| self.lo + i as f64 * self.bin_width())
            .collect()
    }

    /// All values counted, inside the range or not.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.outside
    }

    fn add(&mut self, x: f64) {
        if !(self.lo..=self.hi).contains(&x) {
            self.outside += 1;
            return;
        }
        let last = self.counts.len() - 1;
        let bin = (((x - self.lo) / self.bin_width()) as usize).min(last);
        self.counts[bin] += 1;
    }

    fn merged(mut self, other: Histogram) -> Histogram {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.outside += other.outside;
        self
    }
}
