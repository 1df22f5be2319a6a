//! Waiting between attempts at a failed write: capped exponential backoff with jitter.

use std::time::Duration;

/// The next wait after `current`: doubled, at most `max`.
pub fn next_backoff(current: Duration, max: Duration) -> Duration {
    current.saturating_mul(2).min(max)
}

/// `wait` plus up to 20% at random, so consumers that failed together do not retry in
/// lockstep against a ClickHouse that is coming back.
pub fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + fastrand::f64() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_millis(1000);
        let mut b = Duration::from_millis(200);
        let mut seen = vec![];
        for _ in 0..5 {
            seen.push(b.as_millis());
            b = next_backoff(b, max);
        }
        assert_eq!(seen, vec![200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let base = Duration::from_millis(1000);
        for _ in 0..100 {
            let j = jitter(base);
            assert!(j >= base && j <= base.mul_f64(1.2), "{j:?}");
        }
    }
}
