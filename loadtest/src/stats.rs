//! What a replay counts while it runs, shared by the pacer, the connection workers and the
//! progress line.
//!
//! One mutex guards it all. A worker takes it once per answer, a few thousand times a
//! second at the peak, which is far below where it would contend; in exchange the progress
//! line and the final report see one consistent picture.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uuid::Uuid;

/// Highest latency the histograms hold, in microseconds (one hour); longer ones are
/// clamped to it, which no bounded run reaches.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// How many 4xx messages the report quotes.
const REJECTION_SAMPLES: usize = 3;

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnd {
    /// 2xx: durable in Kafka. `acked` is the server's `accepted` count.
    Accepted { acked: Option<u64> },
    /// 4xx: the server refused the input; never retried.
    Rejected { code: String, message: String },
    /// Retries ran out (attempts or time); the events may or may not have landed.
    GivenUp,
}

/// Counters of one replay.
#[derive(Debug)]
pub struct Tally {
    pub batches_submitted: u64,
    pub events_submitted: u64,
    /// Events whose batch went out at least once.
    pub events_sent: u64,
    pub events_accepted: u64,
    pub batches_accepted: u64,
    pub events_rejected: u64,
    pub batches_rejected: u64,
    pub events_given_up: u64,
    pub batches_given_up: u64,
    /// Attempts after the first one, over all batches.
    pub retries: u64,
    /// Every attempt by HTTP status, or by failure (`connect_error`, `timeout`, `io_error`).
    pub attempts_by_status: BTreeMap<String, u64>,
    /// 4xx answers by their `error` code.
    pub rejections_by_error: BTreeMap<String, u64>,
    pub rejection_samples: Vec<String>,
    /// 2xx answers whose `accepted` count differs from the batch size or could not be read.
    pub ack_mismatches: u64,
    /// Microseconds from a batch's intended send time to its final answer (all outcomes).
    pub latency: Histogram<u64>,
    /// The same since the last progress line.
    window_latency: Histogram<u64>,
    /// Accepted events by the wall-clock second (since start) their answer came in.
    pub accepted_per_second: Vec<u64>,
    pub submitted_ids: Vec<Uuid>,
    pub accepted_ids: Vec<Uuid>,
    /// Where the pacer is: match minute, target events/s and period name.
    pub minute: f64,
    pub target_rate: f64,
    pub period: String,
    /// When the last batch reached its end.
    pub last_end: Option<Instant>,
}

/// A point-in-time view for the progress line.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub elapsed: Duration,
    pub minute: f64,
    pub period: String,
    pub target_rate: f64,
    pub events_sent: u64,
    pub events_accepted: u64,
    /// Attempts answered 202 (the contract's only success).
    pub accepted_answers: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub connection_errors: u64,
    /// p99 latency over the last window, in milliseconds (none if nothing ended).
    pub window_p99_ms: Option<f64>,
}

/// The shared counters and the instant the replay started.
pub struct Stats {
    pub started: Instant,
    tally: Mutex<Tally>,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("latency histogram bounds are constants: 1 us to 1 h, 3 digits")
}

impl Stats {
    /// Empty counters for a replay that started at `started`.
    pub fn new(started: Instant) -> Stats {
        Stats {
            started,
            tally: Mutex::new(Tally {
                batches_submitted: 0,
                events_submitted: 0,
                events_sent: 0,
                events_accepted: 0,
                batches_accepted: 0,
                events_rejected: 0,
                batches_rejected: 0,
                events_given_up: 0,
                batches_given_up: 0,
                retries: 0,
                attempts_by_status: BTreeMap::new(),
                rejections_by_error: BTreeMap::new(),
                rejection_samples: Vec::new(),
                ack_mismatches: 0,
                latency: latency_histogram(),
                window_latency: latency_histogram(),
                accepted_per_second: Vec::new(),
                submitted_ids: Vec::new(),
                accepted_ids: Vec::new(),
                minute: 0.0,
                target_rate: 0.0,
                period: String::new(),
                last_end: None,
            }),
        }
    }

    /// Locks the tally. A worker that panicked while holding it leaves counters that are
    /// still worth reporting, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Tally> {
        self.tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pacer handed a batch to the pool.
    pub fn record_submitted(&self, ids: &[Uuid], minute: f64, target_rate: f64, period: &str) {
        let mut t = self.lock();
        t.batches_submitted += 1;
        t.events_submitted += ids.len() as u64;
        t.submitted_ids.extend_from_slice(ids);
        t.minute = minute;
        t.target_rate = target_rate;
        if t.period != period {
            t.period = period.to_string();
        }
    }

    /// One attempt finished with `status` (an HTTP status or a failure name).
    pub fn record_attempt(&self, status: &str, attempt: u32, events: usize) {
        let mut t = self.lock();
        *t.attempts_by_status.entry(status.to_string()).or_default() += 1;
        if attempt == 1 {
            t.events_sent += events as u64;
        } else {
            t.retries += 1;
        }
    }

    /// A batch reached its end `latency` after its intended send time.
    pub fn record_end(&self, ids: &[Uuid], end: BatchEnd, latency: Duration) {
        let now = Instant::now();
        let events = ids.len() as u64;
        let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US);

        let mut t = self.lock();
        t.latency.saturating_record(us.max(1));
        t.window_latency.saturating_record(us.max(1));
        t.last_end = Some(now);
        match end {
            BatchEnd::Accepted { acked } => {
                t.events_accepted += events;
                t.batches_accepted += 1;
                t.accepted_ids.extend_from_slice(ids);
                if acked != Some(events) {
                    t.ack_mismatches += 1;
                }
                let second = now.saturating_duration_since(self.started).as_secs() as usize;
                if t.accepted_per_second.len() <= second {
                    t.accepted_per_second.resize(second + 1, 0);
                }
                t.accepted_per_second[second] += events;
            }
            BatchEnd::Rejected { code, message } => {
                t.events_rejected += events;
                t.batches_rejected += 1;
                *t.rejections_by_error.entry(code.clone()).or_default() += 1;
                if t.rejection_samples.len() < REJECTION_SAMPLES {
                    t.rejection_samples.push(format!("{code}: {message}"));
                }
            }
            BatchEnd::GivenUp => {
                t.events_given_up += events;
                t.batches_given_up += 1;
            }
        }
    }

    /// The progress so far; starts a new latency window.
    pub fn progress(&self) -> Progress {
        let elapsed = self.started.elapsed();
        let mut t = self.lock();
        let count = |first: char| -> u64 {
            t.attempts_by_status
                .iter()
                .filter(|(k, _)| k.starts_with(first))
                .map(|(_, v)| v)
                .sum()
        };
        let window_p99_ms = if t.window_latency.is_empty() {
            None
        } else {
            Some(t.window_latency.value_at_quantile(0.99) as f64 / 1000.0)
        };
        let progress = Progress {
            elapsed,
            minute: t.minute,
            period: t.period.clone(),
            target_rate: t.target_rate,
            events_sent: t.events_sent,
            events_accepted: t.events_accepted,
            accepted_answers: t.attempts_by_status.get("202").copied().unwrap_or(0),
            client_errors: count('4'),
            server_errors: count('5'),
            connection_errors: t
                .attempts_by_status
                .iter()
                .filter(|(k, _)| !k.starts_with(|c: char| c.is_ascii_digit()))
                .map(|(_, v)| v)
                .sum(),
            window_p99_ms,
        };
        t.window_latency.reset();
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes_and_resets_the_window() {
        let stats = Stats::new(Instant::now());
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        stats.record_submitted(&ids, 12.5, 400.0, "first_half");
        stats.record_attempt("503", 1, 3);
        stats.record_attempt("connect_error", 2, 3);
        stats.record_attempt("202", 3, 3);
        let accepted = BatchEnd::Accepted { acked: Some(3) };
        stats.record_end(&ids, accepted, Duration::from_millis(20));

        let p = stats.progress();
        assert_eq!((p.events_sent, p.events_accepted), (3, 3));
        assert_eq!(
            (p.accepted_answers, p.server_errors, p.connection_errors),
            (1, 1, 1)
        );
        assert_eq!(p.period, "first_half");
        let p99 = p.window_p99_ms.expect("one latency recorded");
        assert!((19.9..20.1).contains(&p99), "{p99}");
        assert_eq!(stats.progress().window_p99_ms, None);

        let t = stats.lock();
        assert_eq!(t.retries, 2);
        assert_eq!(t.ack_mismatches, 0);
        assert_eq!(t.accepted_per_second.iter().sum::<u64>(), 3);
    }

    #[test]
    fn an_ack_with_the_wrong_count_is_a_mismatch() {
        let stats = Stats::new(Instant::now());
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        let end = BatchEnd::Accepted { acked: Some(1) };
        stats.record_end(&ids, end, Duration::from_millis(1));
        assert_eq!(stats.lock().ack_mismatches, 1);
    }
}
