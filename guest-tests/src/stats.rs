//! Latency statistics shared by the guest benchmarks (parsed from `GPUPROBE bench` lines) and
//! the host ping-pong baseline.

use crate::report::Fact;

/// Per-access latency statistics, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Timed accesses.
    pub n: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile (nearest rank).
    pub p99_ns: u64,
    /// Mean of the individually timed accesses.
    pub mean_ns: u64,
    /// Fastest access.
    pub min_ns: u64,
    /// Slowest access.
    pub max_ns: u64,
    /// Mean of a separate untimed loop (no per-access timer cost), if measured.
    pub loop_mean_ns: Option<u64>,
}

/// The nearest-rank percentile `p` (0-100) of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    let n = sorted.len();
    sorted[(n * p).div_ceil(100).clamp(1, n) - 1]
}

impl Latency {
    /// Statistics of `samples` (sorted in place); `None` if there are none.
    pub fn from_samples(samples: &mut [u64]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len() as u64;
        Some(Latency {
            n,
            p50_ns: percentile(samples, 50),
            p99_ns: percentile(samples, 99),
            mean_ns: samples.iter().sum::<u64>() / n,
            min_ns: samples[0],
            max_ns: samples[samples.len() - 1],
            loop_mean_ns: None,
        })
    }

    /// From the fields of a `GPUPROBE bench ... kind=latency` line.
    pub fn from_fact(f: &Fact) -> Option<Latency> {
        Some(Latency {
            n: f.num("n")?,
            p50_ns: f.num("p50_ns")?,
            p99_ns: f.num("p99_ns")?,
            mean_ns: f.num("mean_ns")?,
            min_ns: f.num("min_ns")?,
            max_ns: f.num("max_ns")?,
            loop_mean_ns: f.num("loop_mean_ns"),
        })
    }
}

/// Nanoseconds as microseconds with a precision that suits the magnitude (`0.085`, `3.41`,
/// `61.2`, `1234`).
pub fn us(ns: u64) -> String {
    let v = ns as f64 / 1000.0;
    if v < 1.0 {
        format!("{v:.3}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_parsing() {
        let mut s: Vec<u64> = (1..=100).rev().collect();
        let l = Latency::from_samples(&mut s).unwrap();
        assert_eq!(
            (l.p50_ns, l.p99_ns, l.min_ns, l.max_ns, l.mean_ns),
            (50, 99, 1, 100, 50)
        );
        assert_eq!(Latency::from_samples(&mut []), None);
        let f = Fact::parse(
            "bench name=x kind=latency n=3 p50_ns=2 p99_ns=3 mean_ns=2 min_ns=1 max_ns=3 loop_mean_ns=1",
        )
        .unwrap();
        assert_eq!(Latency::from_fact(&f).unwrap().loop_mean_ns, Some(1));
        assert_eq!(
            (us(85), us(3410), us(61_240), us(1_234_000)),
            ("0.085".into(), "3.41".into(), "61.2".into(), "1234".into())
        );
    }
}
