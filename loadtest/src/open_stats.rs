//! What an open-model run counts, phase by phase (warm-up, base/spike/after, ramp steps).
//!
//! A request belongs to the phase of its *intended* send time, whenever its answer comes,
//! so a phase's latency includes the queueing its own load caused. One mutex guards it all;
//! it is taken once per request end and once per attempt, which stays far below contention
//! at 100k requests/s, and gives the progress line one consistent picture.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use uuid::Uuid;

use crate::report::LatencyMs;
use crate::stats::BatchEnd;

/// Highest latency held, in microseconds (one hour); longer ones are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("latency histogram bounds are constants: 1 us to 1 h, 3 digits")
}

/// Counters of one phase.
#[derive(Debug, Clone)]
pub struct PhaseTally {
    pub name: String,
    pub target_events_per_s: f64,
    /// Length of the phase's schedule, the denominator of its rates.
    pub planned_s: f64,
    /// Warm-up is counted but left out of the result.
    pub measured: bool,
    /// Attempts, first ones and retries.
    pub requests_sent: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Attempts answered anything but 2xx, or not answered.
    pub failed_attempts: u64,
    pub events_sent: u64,
    pub events_accepted: u64,
    pub requests_accepted: u64,
    pub events_rejected: u64,
    pub events_given_up: u64,
    pub ack_mismatches: u64,
    /// Requests issued and not yet at their end.
    pub outstanding: u64,
    /// Microseconds from intended send time to final answer, all outcomes.
    pub latency: Histogram<u64>,
}

impl PhaseTally {
    fn new(name: &str, target_events_per_s: f64, planned_s: f64, measured: bool) -> PhaseTally {
        PhaseTally {
            name: name.to_string(),
            target_events_per_s,
            planned_s,
            measured,
            requests_sent: 0,
            by_status: BTreeMap::new(),
            failed_attempts: 0,
            events_sent: 0,
            events_accepted: 0,
            requests_accepted: 0,
            events_rejected: 0,
            events_given_up: 0,
            ack_mismatches: 0,
            outstanding: 0,
            latency: latency_histogram(),
        }
    }

    fn absorb(&mut self, other: &PhaseTally) {
        self.planned_s += other.planned_s;
        self.requests_sent += other.requests_sent;
        for (k, v) in &other.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        self.failed_attempts += other.failed_attempts;
        self.events_sent += other.events_sent;
        self.events_accepted += other.events_accepted;
        self.requests_accepted += other.requests_accepted;
        self.events_rejected += other.events_rejected;
        self.events_given_up += other.events_given_up;
        self.ack_mismatches += other.ack_mismatches;
        self.outstanding += other.outstanding;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    /// The phase as the JSON report's `result` shape.
    pub fn result(&self) -> PhaseResult {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let per_s = |n: u64| {
            if self.planned_s > 0.0 {
                n as f64 / self.planned_s
            } else {
                0.0
            }
        };
        let empty = self.latency.is_empty();
        PhaseResult {
            name: self.name.clone(),
            target_events_per_s: self.target_events_per_s,
            measured_s: self.planned_s,
            requests: RequestCounts {
                sent: self.requests_sent,
                by_status: self.by_status.clone(),
            },
            events: EventCounts {
                sent: self.events_sent,
                accepted: self.events_accepted,
                rejected: self.events_rejected,
                given_up: self.events_given_up,
            },
            ack_mismatches: self.ack_mismatches,
            failed_attempts: self.failed_attempts,
            achieved_events_per_s: per_s(self.events_accepted),
            achieved_requests_per_s: per_s(self.requests_accepted),
            latency_ms: LatencyMs {
                count: self.latency.len(),
                p50: if empty { 0.0 } else { ms(0.5) },
                p90: if empty { 0.0 } else { ms(0.9) },
                p99: if empty { 0.0 } else { ms(0.99) },
                p999: if empty { 0.0 } else { ms(0.999) },
                max: if empty {
                    0.0
                } else {
                    self.latency.max() as f64 / 1000.0
                },
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RequestCounts {
    /// Attempts, retries included.
    pub sent: u64,
    /// Attempts by HTTP status, or `timeout`, `connect_error`, `io_error`.
    pub by_status: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventCounts {
    /// Events whose request went out at least once.
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Retries ran out; they may or may not have landed.
    pub given_up: u64,
}

/// One phase's (or the whole measured run's) numbers, as the JSON report has them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhaseResult {
    pub name: String,
    pub target_events_per_s: f64,
    pub measured_s: f64,
    pub requests: RequestCounts,
    pub events: EventCounts,
    pub ack_mismatches: u64,
    /// Attempts answered anything but 2xx, or not answered at all.
    pub failed_attempts: u64,
    /// Accepted events per second of the phase's schedule.
    pub achieved_events_per_s: f64,
    /// Requests answered 2xx per second of the phase's schedule.
    pub achieved_requests_per_s: f64,
    pub latency_ms: LatencyMs,
}

/// One progress line's numbers, over the last window.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub elapsed: Duration,
    pub phase: String,
    pub target_events_per_s: f64,
    pub events_accepted: u64,
    pub window: Duration,
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub errors: u64,
    pub window_p99_ms: Option<f64>,
}

struct Inner {
    phases: Vec<PhaseTally>,
    current: usize,
    window_started: Instant,
    window_latency: Histogram<u64>,
    window_events_accepted: u64,
    window_counts: [u64; 4],
    /// Only filled when the run verifies.
    submitted_ids: Vec<Uuid>,
    accepted_ids: Vec<Uuid>,
}

/// The shared counters of an open-model run.
pub struct OpenStats {
    pub started: Instant,
    inner: Mutex<Inner>,
}

impl OpenStats {
    pub fn new(started: Instant) -> OpenStats {
        OpenStats {
            started,
            inner: Mutex::new(Inner {
                phases: Vec::new(),
                current: 0,
                window_started: started,
                window_latency: latency_histogram(),
                window_events_accepted: 0,
                window_counts: [0; 4],
                submitted_ids: Vec::new(),
                accepted_ids: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicked holder leaves counters still worth reporting.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a phase and makes it the one the progress line shows; returns its index.
    pub fn begin_phase(&self, name: &str, target: f64, planned_s: f64, measured: bool) -> usize {
        let mut inner = self.lock();
        inner
            .phases
            .push(PhaseTally::new(name, target, planned_s, measured));
        inner.current = inner.phases.len() - 1;
        inner.current
    }

    /// Shortens a phase's planned length (a run cut short by `--duration-limit`).
    pub fn set_planned(&self, phase: usize, planned_s: f64) {
        if let Some(p) = self.lock().phases.get_mut(phase) {
            p.planned_s = planned_s;
        }
    }

    /// A request of `events` events was issued.
    pub fn record_issued(&self, phase: usize, events: usize, ids: Option<&[Uuid]>) {
        let mut inner = self.lock();
        if let Some(ids) = ids {
            inner.submitted_ids.extend_from_slice(ids);
        }
        if let Some(p) = inner.phases.get_mut(phase) {
            p.outstanding += 1;
            p.events_sent += events as u64;
        }
    }

    /// One attempt ended with `key` (an HTTP status or a failure name).
    pub fn record_attempt(&self, phase: usize, key: &str) {
        let mut inner = self.lock();
        let class = match key.as_bytes().first() {
            Some(b'2') => 0,
            Some(b'4') => 1,
            Some(b'5') => 2,
            _ => 3,
        };
        inner.window_counts[class] += 1;
        if let Some(p) = inner.phases.get_mut(phase) {
            p.requests_sent += 1;
            if class != 0 {
                p.failed_attempts += 1;
            }
            match p.by_status.get_mut(key) {
                Some(n) => *n += 1,
                None => {
                    p.by_status.insert(key.to_string(), 1);
                }
            }
        }
    }

    /// A request reached its end `latency` after its intended send time.
    pub fn record_end(
        &self,
        phase: usize,
        events: usize,
        ids: Option<&[Uuid]>,
        end: &BatchEnd,
        latency: Duration,
    ) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_LATENCY_US)
            .max(1);
        let events = events as u64;
        let mut inner = self.lock();
        inner.window_latency.saturating_record(us);
        if let BatchEnd::Accepted { .. } = end {
            inner.window_events_accepted += events;
            if let Some(ids) = ids {
                inner.accepted_ids.extend_from_slice(ids);
            }
        }
        let Some(p) = inner.phases.get_mut(phase) else {
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        p.latency.saturating_record(us);
        match end {
            BatchEnd::Accepted { acked } => {
                p.events_accepted += events;
                p.requests_accepted += 1;
                if *acked != Some(events) {
                    p.ack_mismatches += 1;
                }
            }
            BatchEnd::Rejected { .. } => p.events_rejected += events,
            BatchEnd::GivenUp => p.events_given_up += events,
        }
    }

    /// Requests of `phase` not yet at their end.
    pub fn outstanding(&self, phase: usize) -> u64 {
        self.lock().phases.get(phase).map_or(0, |p| p.outstanding)
    }

    /// A copy of one phase.
    pub fn phase(&self, phase: usize) -> Option<PhaseTally> {
        self.lock().phases.get(phase).cloned()
    }

    /// Copies of all phases, in order.
    pub fn phases(&self) -> Vec<PhaseTally> {
        self.lock().phases.clone()
    }

    /// The measured phases merged into one, named `name`.
    pub fn measured_total(&self, name: &str) -> PhaseTally {
        let inner = self.lock();
        let mut total = PhaseTally::new(name, 0.0, 0.0, true);
        let mut weighted_target = 0.0;
        for p in inner.phases.iter().filter(|p| p.measured) {
            total.absorb(p);
            weighted_target += p.target_events_per_s * p.planned_s;
        }
        if total.planned_s > 0.0 {
            total.target_events_per_s = weighted_target / total.planned_s;
        }
        total
    }

    /// The ids sent and the ids acknowledged (empty unless the run keeps ids).
    pub fn take_ids(&self) -> (Vec<Uuid>, Vec<Uuid>) {
        let mut inner = self.lock();
        (
            std::mem::take(&mut inner.submitted_ids),
            std::mem::take(&mut inner.accepted_ids),
        )
    }

    /// The last window's numbers; starts a new window.
    pub fn progress(&self) -> Progress {
        let now = Instant::now();
        let mut inner = self.lock();
        let (phase, target) = inner
            .phases
            .get(inner.current)
            .map_or((String::new(), 0.0), |p| {
                (p.name.clone(), p.target_events_per_s)
            });
        let window_p99_ms = (!inner.window_latency.is_empty())
            .then(|| inner.window_latency.value_at_quantile(0.99) as f64 / 1000.0);
        let [ok, client_errors, server_errors, errors] = inner.window_counts;
        let progress = Progress {
            elapsed: now.saturating_duration_since(self.started),
            phase,
            target_events_per_s: target,
            events_accepted: inner.window_events_accepted,
            window: now.saturating_duration_since(inner.window_started),
            ok,
            client_errors,
            server_errors,
            errors,
            window_p99_ms,
        };
        inner.window_latency.reset();
        inner.window_events_accepted = 0;
        inner.window_counts = [0; 4];
        inner.window_started = now;
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_phase_and_leaves_warmup_out_of_the_total() {
        let stats = OpenStats::new(Instant::now());
        let warm = stats.begin_phase("warmup", 100.0, 1.0, false);
        let base = stats.begin_phase("base", 100.0, 2.0, true);
        let ok = BatchEnd::Accepted { acked: Some(2) };
        stats.record_issued(warm, 2, None);
        stats.record_attempt(warm, "202");
        stats.record_end(warm, 2, None, &ok, Duration::from_millis(1));
        for _ in 0..3 {
            stats.record_issued(base, 2, None);
        }
        stats.record_attempt(base, "503");
        stats.record_attempt(base, "202");
        stats.record_end(base, 2, None, &ok, Duration::from_millis(10));
        stats.record_attempt(base, "202");
        stats.record_end(
            base,
            2,
            None,
            &BatchEnd::Accepted { acked: None },
            Duration::from_millis(10),
        );
        stats.record_attempt(base, "timeout");
        stats.record_end(base, 2, None, &BatchEnd::GivenUp, Duration::from_millis(30));

        assert_eq!(stats.outstanding(base), 0);
        let total = stats.measured_total("steady").result();
        assert_eq!(total.requests.sent, 4);
        assert_eq!(total.requests.by_status.get("202"), Some(&2));
        assert_eq!(
            (
                total.events.sent,
                total.events.accepted,
                total.events.given_up
            ),
            (6, 4, 2)
        );
        assert_eq!(total.ack_mismatches, 1);
        assert_eq!(total.failed_attempts, 2);
        assert!((total.achieved_events_per_s - 2.0).abs() < 1e-9);
        assert!((total.latency_ms.max - 30.0).abs() < 0.1);

        let p = stats.progress();
        assert_eq!((p.ok, p.server_errors, p.errors), (3, 1, 1));
        assert_eq!(p.phase, "base");
        assert_eq!(stats.progress().ok, 0);
    }
}
