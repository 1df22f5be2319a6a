//! Which rate `loadtest ramp` tries next, and whether a step held: pure logic, no I/O.
//!
//! Steps grow geometrically from the start rate (`x step_factor`, the last one capped at
//! `--max-rate`). The climb stops at the first step that does not hold; then up to two
//! bisection steps between the last held and the first failed rate narrow the answer.
//! The result is the highest rate that held.

use serde::Serialize;

/// A step holds only if at least this share of its target rate was accepted.
pub const MIN_ACHIEVED_SHARE: f64 = 0.95;

/// A step holds only if at most this share of its attempts were non-2xx or unanswered.
pub const MAX_FAILED_SHARE: f64 = 0.001;

/// Bisection steps after the climb.
pub const BISECTIONS: u32 = 2;

/// What one step measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepOutcome {
    pub target_events_per_s: f64,
    pub achieved_events_per_s: f64,
    pub p99_ms: f64,
    /// Attempts answered anything but 2xx, or not at all.
    pub errors: u64,
    pub requests: u64,
    pub held: bool,
    /// `climb` or `bisect`.
    pub kind: &'static str,
}

/// Whether a step held: enough throughput, p99 within the bound, almost no failures.
pub fn step_held(
    target: f64,
    achieved: f64,
    p99_ms: f64,
    bound_ms: f64,
    errors: u64,
    requests: u64,
) -> bool {
    requests > 0
        && achieved >= MIN_ACHIEVED_SHARE * target
        && p99_ms <= bound_ms
        && errors as f64 <= MAX_FAILED_SHARE * requests as f64
}

/// The ramp's state between steps.
#[derive(Debug, Clone)]
pub struct RampPlan {
    factor: f64,
    max_rate: f64,
    next: Option<f64>,
    bisecting: bool,
    bisections_left: u32,
    last_held: Option<f64>,
    first_failed: Option<f64>,
}

impl RampPlan {
    /// A ramp from `start` growing by `factor` up to `max_rate`.
    pub fn new(start: f64, factor: f64, max_rate: f64) -> RampPlan {
        RampPlan {
            factor,
            max_rate,
            next: Some(start.min(max_rate)),
            bisecting: false,
            bisections_left: BISECTIONS,
            last_held: None,
            first_failed: None,
        }
    }

    /// The rate of the next step, none when the ramp is over.
    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    /// Whether the next step is a bisection step.
    pub fn bisecting(&self) -> bool {
        self.bisecting
    }

    /// The highest rate that held so far.
    pub fn max_held(&self) -> Option<f64> {
        self.last_held
    }

    /// Records the outcome of the step at `next_rate()` and plans the one after.
    pub fn record(&mut self, held: bool) {
        let Some(rate) = self.next else { return };
        if held {
            self.last_held = Some(rate);
        } else {
            self.first_failed = Some(rate);
        }

        if !self.bisecting {
            if held {
                self.next = (rate < self.max_rate).then(|| (rate * self.factor).min(self.max_rate));
                return;
            }
            if self.last_held.is_none() {
                self.next = None;
                return;
            }
            self.bisecting = true;
        } else {
            self.bisections_left = self.bisections_left.saturating_sub(1);
        }

        self.next = match (self.last_held, self.first_failed) {
            (Some(lo), Some(hi)) if self.bisections_left > 0 => Some((lo + hi) / 2.0),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(plan: &mut RampPlan, capacity: f64) -> Vec<f64> {
        let mut tried = Vec::new();
        while let Some(rate) = plan.next_rate() {
            tried.push(rate);
            plan.record(rate <= capacity);
        }
        tried
    }

    #[test]
    fn climbs_geometrically_then_bisects_twice() {
        let mut plan = RampPlan::new(1000.0, 2.0, 1e9);
        let tried = run(&mut plan, 5000.0);
        assert_eq!(tried, [1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0]);
        assert_eq!(plan.max_held(), Some(5000.0));
    }

    #[test]
    fn bisection_moves_down_when_the_middle_fails() {
        let mut plan = RampPlan::new(1000.0, 2.0, 1e9);
        let tried = run(&mut plan, 4500.0);
        assert_eq!(tried, [1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0]);
        assert_eq!(plan.max_held(), Some(4000.0));
    }

    #[test]
    fn stops_at_max_rate_when_everything_holds() {
        let mut plan = RampPlan::new(100.0, 1.25, 200.0);
        let tried = run(&mut plan, 1e9);
        assert_eq!(tried, [100.0, 125.0, 156.25, 195.3125, 200.0]);
        assert_eq!(plan.max_held(), Some(200.0));
    }

    #[test]
    fn nothing_holds_when_the_first_step_fails() {
        let mut plan = RampPlan::new(100.0, 1.25, 200.0);
        assert_eq!(run(&mut plan, 50.0), [100.0]);
        assert_eq!(plan.max_held(), None);
    }

    #[test]
    fn a_step_holds_on_rate_latency_and_errors() {
        assert!(step_held(1000.0, 960.0, 40.0, 50.0, 1, 1000));
        assert!(!step_held(1000.0, 940.0, 40.0, 50.0, 0, 1000));
        assert!(!step_held(1000.0, 1000.0, 51.0, 50.0, 0, 1000));
        assert!(!step_held(1000.0, 1000.0, 10.0, 50.0, 2, 1000));
        assert!(!step_held(1000.0, 1000.0, 10.0, 50.0, 0, 0));
    }
}
