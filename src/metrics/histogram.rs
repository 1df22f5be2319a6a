//! An hdrhistogram with the few operations the exporters need.

use hdrhistogram::Histogram;

/// Highest value a latency histogram tracks, in microseconds (one minute); larger values
/// are clamped so a stuck request still shows up in the top bucket.
const MAX_TRACKED_US: u64 = 60_000_000;

/// A latency or size histogram with 3 significant digits.
#[derive(Debug, Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
    sum: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new(MAX_TRACKED_US)
    }
}

impl Recorder {
    /// A histogram tracking values from 1 to `max`.
    pub fn new(max: u64) -> Self {
        let hist = Histogram::new_with_bounds(1, max.max(2), 3)
            .expect("a 1..max range (max >= 2) with 3 significant digits is always valid");
        Self { hist, sum: 0 }
    }

    /// Records one value, clamped into the tracked range.
    pub fn record(&mut self, value: u64) {
        self.hist.saturating_record(value.max(1));
        self.sum = self.sum.saturating_add(value);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Value at quantile `q` (0.0-1.0); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    pub fn max(&self) -> u64 {
        self.hist.max()
    }

    /// Cumulative counts at each upper bound (same unit as recorded values), as
    /// Prometheus `le` buckets need them.
    pub fn cumulative(&self, bounds: &[u64]) -> Vec<u64> {
        let mut counts = vec![0u64; bounds.len()];
        for item in self.hist.iter_recorded() {
            let value = item.value_iterated_to();
            if let Some(slot) = bounds.iter().position(|b| value <= *b) {
                counts[slot] += item.count_at_value();
            }
        }
        let mut running = 0;
        for count in &mut counts {
            running += *count;
            *count = running;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_buckets_are_monotonic_and_complete() {
        let mut rec = Recorder::default();
        for v in [100, 900, 1_000, 5_000, 70_000_000] {
            rec.record(v);
        }
        let counts = rec.cumulative(&[1_000, 10_000, u64::MAX]);
        assert_eq!(counts, vec![3, 4, 5]);
        assert_eq!(rec.count(), 5);
    }

    #[test]
    fn quantiles_of_empty_histogram_are_zero() {
        assert_eq!(Recorder::default().quantile(0.99), 0);
    }
}
