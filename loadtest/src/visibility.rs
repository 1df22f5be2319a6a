//! `--probe-visibility`: how long after its 202 an event shows in the metrics endpoint.
//!
//! A few times a second a probe posts one event under a match id of its own, through the
//! load's own connections (so it queues behind the load like any event), then polls
//! `GET /v1/matches/{probe}/metrics` every 50 ms until `total_events` is at least 1 or
//! 10 s pass. The time runs from the 202 to the first answer that shows the event.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::body_template::{BodyTemplate, DEFAULT_EVENT_BYTES};
use crate::client::Connection;
use crate::open_model::Engine;
use crate::target::Target;

/// Pause between probes: about three a second.
pub const PROBE_EVERY: Duration = Duration::from_millis(330);

/// Pause between polls of one probe.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// A probe not visible after this long counts as unseen.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Largest metrics answer read for one probe (one event, one bucket).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The report's `visibility_ms`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VisibilityReport {
    /// Probes whose event was accepted.
    pub probes: u64,
    pub seen: u64,
    pub unseen: u64,
    /// Probes whose post was not answered 2xx (not part of `probes`).
    pub post_failed: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Default)]
struct Tally {
    probes: u64,
    seen: u64,
    unseen: u64,
    post_failed: u64,
    latency_us: Vec<u64>,
}

/// The probes' shared counters.
#[derive(Clone, Default)]
pub struct Probes {
    tally: Arc<Mutex<Tally>>,
}

#[derive(Deserialize)]
struct MetricsTotal {
    total_events: u64,
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The report so far.
    pub fn report(&self) -> VisibilityReport {
        let t = self.lock();
        let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .expect("histogram bounds are constants");
        for us in &t.latency_us {
            hist.saturating_record((*us).max(1));
        }
        let ms = |q: f64| {
            if hist.is_empty() {
                0.0
            } else {
                hist.value_at_quantile(q) as f64 / 1000.0
            }
        };
        VisibilityReport {
            probes: t.probes,
            seen: t.seen,
            unseen: t.unseen,
            post_failed: t.post_failed,
            p50: ms(0.5),
            p99: ms(0.99),
            max: if hist.is_empty() {
                0.0
            } else {
                hist.max() as f64 / 1000.0
            },
        }
    }
}

/// Posts one probe event and waits until the metrics endpoint counts it.
async fn probe(engine: Arc<Engine>, reader: Arc<Target>, probe_id: String, probes: Probes) {
    let mut template = BodyTemplate::new(&probe_id, engine.settings.format, 1, DEFAULT_EVENT_BYTES);
    let body = template.next_body(false);
    match engine.post_uncounted(&body.bytes).await {
        Ok(a) if a.status.is_success() => probes.lock().probes += 1,
        _ => {
            probes.lock().post_failed += 1;
            return;
        }
    }
    let acked = Instant::now();

    let path = format!("/v1/matches/{probe_id}/metrics");
    let mut connection = Connection::new(reader);
    while acked.elapsed() < GIVE_UP_AFTER {
        let answer = connection
            .send(
                Method::GET,
                &path,
                "text/plain",
                Bytes::new(),
                Duration::from_secs(5),
                MAX_ANSWER_BYTES,
            )
            .await;
        let seen = match answer {
            Ok(a) if a.status == StatusCode::OK => {
                serde_json::from_slice::<MetricsTotal>(&a.body).is_ok_and(|m| m.total_events >= 1)
            }
            _ => false,
        };
        if seen {
            let us = acked.elapsed().as_micros() as u64;
            let mut t = probes.lock();
            t.seen += 1;
            t.latency_us.push(us);
            return;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    probes.lock().unseen += 1;
}

/// Sends probes until `stop` turns true; the returned handle ends once the last probe
/// has its answer (at most `GIVE_UP_AFTER` later).
pub fn spawn_probes(
    engine: Arc<Engine>,
    reader: Arc<Target>,
    run_tag: String,
    mut stop: watch::Receiver<bool>,
    probes: Probes,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let mut n = 0u64;
        while !*stop.borrow() {
            let probe_id = format!("{run_tag}-p{n}");
            let (engine, reader) = (Arc::clone(&engine), Arc::clone(&reader));
            tasks.spawn(probe(engine, reader, probe_id, probes.clone()));
            n += 1;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_percentiles_of_seen_probes() {
        let probes = Probes::default();
        {
            let mut t = probes.lock();
            t.probes = 4;
            t.seen = 3;
            t.unseen = 1;
            t.latency_us = vec![100_000, 200_000, 300_000];
        }
        let r = probes.report();
        assert_eq!((r.probes, r.seen, r.unseen), (4, 3, 1));
        assert!((r.p50 - 200.0).abs() < 1.0, "{}", r.p50);
        assert!((r.max - 300.0).abs() < 1.0, "{}", r.max);
    }
}
