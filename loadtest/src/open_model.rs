//! The open-model engine the `steady`, `spike` and `ramp` profiles share.
//!
//! Open model: requests are issued on a fixed schedule (`start + k / rate`) whatever the
//! server does, and each request's latency is counted from that intended send time, not
//! from when a connection got free. A slow server therefore shows up as latency instead
//! of quietly lowering the load (coordinated omission, corrected). When every connection
//! is busy, a request waits its turn for one; when `MAX_OUTSTANDING` requests are waiting,
//! the pacer waits too, which again only shows as latency.
//!
//! Each request is its own task: take the connection idle longest, send, put it back,
//! count. A retry (spike's default) sleeps in that task without holding a connection and
//! resends the same bytes, hence the same event ids.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::body_template::{BodyFormat, BodyTemplate};
use crate::client::{classify, retry_delay, Answer, Next, SendError};
use crate::conn_pool::ConnPool;
use crate::open_stats::OpenStats;
use crate::stats::BatchEnd;
use crate::target::Target;
use crate::wire;

/// Requests issued and not yet ended before the pacer waits: at ~1 KiB each (task, body,
/// ids) this caps the generator's own queue near 200 MiB.
pub const MAX_OUTSTANDING: usize = 200_000;

/// How often idle connections are checked against the server's idle timeout.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Idle time after which a connection is touched: the server closes at 75 s.
const MAX_IDLE: Duration = Duration::from_secs(50);

/// How the rate flags count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    Events,
    Requests,
}

/// What every request of the run shares.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub max_attempts: u32,
    pub request_timeout: Duration,
    pub rate_unit: RateUnit,
    pub format: BodyFormat,
    /// Keep ids for the verification.
    pub keep_ids: bool,
    /// No retry is scheduled past this instant.
    pub deadline: Instant,
    pub seed: u64,
}

/// The engine: a connection pool, counters and the settings.
pub struct Engine {
    pub target: Arc<Target>,
    pub pool: Arc<ConnPool>,
    pub stats: Arc<OpenStats>,
    pub settings: EngineSettings,
    outstanding: Arc<Semaphore>,
    /// Where the schedule stands: the next phase starts here, so phases abut.
    next_due: std::sync::Mutex<Option<Instant>>,
}

/// One request: its bytes and what it counts for.
struct Request {
    phase: usize,
    events: usize,
    ids: Option<Vec<Uuid>>,
    wire: Bytes,
    due: Instant,
}

impl Engine {
    pub fn new(
        target: Arc<Target>,
        pool: Arc<ConnPool>,
        stats: Arc<OpenStats>,
        settings: EngineSettings,
    ) -> Engine {
        Engine {
            target,
            pool,
            stats,
            settings,
            outstanding: Arc::new(Semaphore::new(MAX_OUTSTANDING)),
            next_due: std::sync::Mutex::new(None),
        }
    }

    /// Requests per second for a rate given in the run's unit.
    pub fn requests_per_s(&self, rate: f64, batch: usize) -> f64 {
        match self.settings.rate_unit {
            RateUnit::Events => rate / batch.max(1) as f64,
            RateUnit::Requests => rate,
        }
    }

    /// Events per second for a rate given in the run's unit.
    pub fn events_per_s(&self, rate: f64, batch: usize) -> f64 {
        match self.settings.rate_unit {
            RateUnit::Events => rate,
            RateUnit::Requests => rate * batch.max(1) as f64,
        }
    }

    /// The full request (head and body) posting `body` to `/v1/events`.
    pub fn ingest_request(&self, body: &[u8]) -> Bytes {
        let mut bytes = wire::request_head(
            "POST",
            &self.target.path("/v1/events"),
            &self.target.authority,
            self.settings.format.content_type(),
            self.target.api_key.as_deref(),
            body.len(),
        );
        bytes.extend_from_slice(body);
        Bytes::from(bytes)
    }

    /// Restarts the schedule at the next call of `run_phase` (ramp steps are separate).
    pub fn restart_schedule(&self) {
        *self.lock_due() = None;
    }

    fn lock_due(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.next_due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues requests for `length` at `rate` (in the run's unit), counted in phase
    /// `name`, then returns the phase's index without waiting for the answers. Stops
    /// early at `stop_at`.
    pub async fn run_phase(
        &self,
        template: &mut BodyTemplate,
        name: &str,
        rate: f64,
        length: Duration,
        measured: bool,
        stop_at: Instant,
    ) -> usize {
        let batch = template.batch();
        let per_s = self.requests_per_s(rate, batch);
        let target = self.events_per_s(rate, batch);
        let start = self.lock_due().unwrap_or_else(Instant::now);
        let end = start + length;
        let phase = self
            .stats
            .begin_phase(name, target, length.as_secs_f64(), measured);

        let mut k: u64 = 0;
        loop {
            let due = start + Duration::from_secs_f64(k as f64 / per_s);
            if due >= end {
                break;
            }
            if due >= stop_at {
                let cut = stop_at.saturating_duration_since(start);
                self.stats.set_planned(phase, cut.as_secs_f64());
                break;
            }
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            let permit = match Arc::clone(&self.outstanding).acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => break,
            };
            let body = template.next_body(self.settings.keep_ids);
            self.stats.record_issued(phase, batch, body.ids.as_deref());
            let request = Request {
                phase,
                events: batch,
                ids: body.ids,
                wire: self.ingest_request(&body.bytes),
                due,
            };
            let seed = self.settings.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            tokio::spawn(send_request(
                Arc::clone(&self.pool),
                Arc::clone(&self.stats),
                self.settings.clone(),
                request,
                permit,
                seed,
            ));
            k += 1;
        }
        *self.lock_due() = Some(end.min(stop_at.max(start)));
        phase
    }

    /// Waits until `phase` has no request left in flight, or `until`.
    pub async fn drain_phase(&self, phase: usize, until: Instant) {
        while self.stats.outstanding(phase) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no request is in flight, or `until`; returns how many still are.
    pub async fn drain_all(&self, until: Instant) -> usize {
        let busy = || MAX_OUTSTANDING - self.outstanding.available_permits();
        while busy() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        busy()
    }

    /// Posts one body through the pool (one attempt, not counted): the visibility probes
    /// use the load's own connections.
    ///
    /// # Errors
    /// As `WireConnection::exchange`, or a timeout.
    pub async fn post_uncounted(&self, body: &[u8]) -> Result<Answer, SendError> {
        let request = self.ingest_request(body);
        let mut taken = self.pool.take().await;
        let result = attempt(
            &self.pool,
            &mut taken.slot,
            &request,
            self.settings.request_timeout,
        )
        .await;
        self.pool.put(taken);
        result
    }

    /// Keeps idle connections from reaching the server's idle timeout until the returned
    /// handle is aborted.
    pub fn spawn_idle_sweep(&self) -> tokio::task::JoinHandle<()> {
        let pool = Arc::clone(&self.pool);
        let authority = self.target.authority.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                pool.sweep_idle(MAX_IDLE, &authority).await;
            }
        })
    }
}

/// One attempt on a slot's connection (opened if needed), within `timeout`. A failed
/// connection, or one the server is closing, is dropped from the slot.
async fn attempt(
    pool: &ConnPool,
    slot: &mut crate::conn_pool::Slot,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, SendError> {
    let exchange = async {
        let connection = pool.connection(slot).await?;
        connection.exchange(request).await
    };
    let result = match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(SendError::Timeout(timeout)),
    };
    match result {
        Ok((answer, reusable)) => {
            if !reusable {
                slot.connection = None;
            }
            Ok(answer)
        }
        Err(e) => {
            slot.connection = None;
            Err(e)
        }
    }
}

/// Sends one request until it ends: accepted, refused, or out of attempts or time.
async fn send_request(
    pool: Arc<ConnPool>,
    stats: Arc<OpenStats>,
    settings: EngineSettings,
    request: Request,
    _permit: OwnedSemaphorePermit,
    seed: u64,
) {
    let mut attempts = 0u32;
    let end = loop {
        attempts += 1;
        let mut taken = pool.take().await;
        let result = attempt(
            &pool,
            &mut taken.slot,
            &request.wire,
            settings.request_timeout,
        )
        .await;
        pool.put(taken);

        let (key, next) = classify(&result);
        stats.record_attempt(request.phase, &key);
        match next {
            Next::End(end) => break end,
            Next::Retry(hint) => {
                let jitter = SmallRng::seed_from_u64(seed ^ u64::from(attempts)).random();
                let delay = retry_delay(attempts, hint, jitter);
                let in_time = Instant::now() + delay < settings.deadline;
                if attempts >= settings.max_attempts || !in_time {
                    break BatchEnd::GivenUp;
                }
                tokio::time::sleep(delay).await;
            }
        }
    };
    let latency = Instant::now().saturating_duration_since(request.due);
    stats.record_end(
        request.phase,
        request.events,
        request.ids.as_deref(),
        &end,
        latency,
    );
}
