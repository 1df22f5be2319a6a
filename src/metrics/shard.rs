//! Per-shard request counters and latency histogram.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::histogram::Recorder;

/// Which handler served a request; a label on every request metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Events,
    Query,
    Health,
    Metrics,
    Other,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Events => "events",
            Route::Query => "query",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Other => "other",
        }
    }
}

/// Status recorded for a request whose client went away before the answer: nginx's 499,
/// so cancelled requests stay visible in the latency tail instead of vanishing.
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// What one shard has served.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub requests: BTreeMap<(Route, u16), u64>,
    /// Request latency in microseconds, per route.
    pub latency_us: BTreeMap<Route, Recorder>,
    pub events_accepted: u64,
}

/// One shard's metrics. Written by its own executor, read by scrapes.
#[derive(Debug)]
pub struct ShardMetrics {
    pub shard: usize,
    stats: Mutex<ShardStats>,
    /// The shard's connection counts, outside the mutex: they change on every accept.
    pub connections: ConnectionStats,
}

/// Connections a shard holds and those it closed on its own (docs/connections.md).
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open right now, refused ones not included.
    pub open: AtomicU64,
    /// Answered 503 `too_many_connections` and closed at accept.
    pub refused_over_limit: AtomicU64,
    /// Answered 408: the request head did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Closed after sitting idle between requests for `http.idle_timeout_ms`.
    pub idle_timeouts: AtomicU64,
    /// Answered 400/414/431 by the HTTP parser and closed.
    pub malformed: AtomicU64,
    /// Accepted here and handed to a less loaded shard (`ingest/balance.rs`).
    pub handed_off: AtomicU64,
}

impl ConnectionStats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter or gauge.
    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        Self {
            shard,
            stats: Mutex::new(ShardStats::default()),
            connections: ConnectionStats::default(),
        }
    }

    /// Records one finished (or abandoned) request.
    pub fn record(&self, route: Route, status: u16, started: Instant, events_accepted: u64) {
        let elapsed_us = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        if let Ok(mut stats) = self.stats.lock() {
            *stats.requests.entry((route, status)).or_default() += 1;
            stats
                .latency_us
                .entry(route)
                .or_default()
                .record(elapsed_us);
            stats.events_accepted += events_accepted;
        }
    }

    /// Runs `f` on a consistent view of the stats.
    pub fn with_stats<T>(&self, f: impl FnOnce(&ShardStats) -> T) -> Option<T> {
        self.stats.lock().ok().map(|stats| f(&stats))
    }
}

/// Records a request's outcome when dropped, so a request cancelled mid-flight (client
/// disconnect) is still counted, as [`STATUS_CLIENT_CLOSED`].
pub struct RequestTimer<'a> {
    metrics: &'a ShardMetrics,
    route: Route,
    started: Instant,
    outcome: Option<(u16, u64)>,
}

impl<'a> RequestTimer<'a> {
    pub fn start(metrics: &'a ShardMetrics, route: Route) -> Self {
        Self {
            metrics,
            route,
            started: Instant::now(),
            outcome: None,
        }
    }

    pub fn set_route(&mut self, route: Route) {
        self.route = route;
    }

    /// Sets the status to record and how many events the request got accepted.
    pub fn finish(&mut self, status: u16, events_accepted: u64) {
        self.outcome = Some((status, events_accepted));
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        let (status, events) = self.outcome.unwrap_or((STATUS_CLIENT_CLOSED, 0));
        self.metrics
            .record(self.route, status, self.started, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_timer_counts_as_client_closed() {
        let metrics = ShardMetrics::new(0);
        drop(RequestTimer::start(&metrics, Route::Events));
        let mut finished = RequestTimer::start(&metrics, Route::Events);
        finished.finish(202, 5);
        drop(finished);
        let (closed, ok, accepted) = metrics
            .with_stats(|s| {
                (
                    s.requests.get(&(Route::Events, 499)).copied(),
                    s.requests.get(&(Route::Events, 202)).copied(),
                    s.events_accepted,
                )
            })
            .expect("stats");
        assert_eq!((closed, ok, accepted), (Some(1), Some(1), 5));
    }
}
