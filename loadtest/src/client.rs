//! HTTP/1.1 to the server under test.
//!
//! `Pool` runs one worker per keep-alive connection. Workers take batches from one shared
//! queue, so a slow connection never holds up the rest. A batch that gets a 429/5xx or a
//! connection error goes back on the queue after a backoff (honouring `Retry-After`) with
//! the *same* body, hence the same event ids, until `max_attempts` or the run's deadline.
//! The waiting happens in a timer task, not in the worker, so its connection keeps serving.
//!
//! `request` is a one-shot call on a fresh connection for readiness, metrics and ClickHouse.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::stats::{BatchEnd, Stats};
use crate::target::Target;

/// How long a TCP connect may take; loopback connects in microseconds, so a slow one means
/// the server's accept queue is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer to `POST /v1/events` read: 25 ids are about 1 KiB.
const MAX_INGEST_ANSWER_BYTES: usize = 1 << 20;

/// First backoff after a failure without `Retry-After`; doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(50);

/// Longest backoff without `Retry-After`.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Longest `Retry-After` honoured, so a confused server cannot stall a run.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Random spread added to `Retry-After`, so a burst of 503s does not come back at once.
const RETRY_AFTER_SPREAD: Duration = Duration::from_millis(250);

/// Queue between the pacer and the workers, in batches: 8,192 batches of 25 events are
/// about 40 MiB and 13 s of the default peak. The open model wants no limit, but memory
/// does; when it fills, the pacer waits and the wait shows up as latency (latency is
/// measured from the intended send time).
const QUEUE_BATCHES: usize = 8192;

/// A server's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    /// `Retry-After` in seconds, when present and numeric.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    Handshake(hyper::Error),
    Request(hyper::Error),
    Body(String),
    Timeout(Duration),
    Build(hyper::http::Error),
}

impl SendError {
    /// The key under which the report counts this failure.
    pub fn status_key(&self) -> &'static str {
        match self {
            SendError::Connect(_) | SendError::Handshake(_) => "connect_error",
            SendError::Timeout(_) => "timeout",
            SendError::Request(_) | SendError::Body(_) | SendError::Build(_) => "io_error",
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect failed: {e}"),
            SendError::Handshake(e) => write!(f, "http handshake failed: {e}"),
            SendError::Request(e) => write!(f, "request failed: {e}"),
            SendError::Body(e) => write!(f, "reading the answer failed: {e}"),
            SendError::Timeout(t) => write!(f, "no answer within {t:?}"),
            SendError::Build(e) => write!(f, "building the request failed: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

/// Parses `Retry-After` given in seconds (the HTTP-date form is not used by our server).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Delay before attempt `attempt + 1`, with `jitter` in `[0, 1)`.
///
/// With `Retry-After` the server's word is kept (capped) plus a small spread; without it,
/// capped exponential backoff with half of it jittered.
pub fn retry_delay(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    match retry_after {
        Some(wait) => wait.min(MAX_RETRY_AFTER) + RETRY_AFTER_SPREAD.mul_f64(jitter),
        None => {
            let doublings = attempt.saturating_sub(1).min(16);
            let full = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX);
            full / 2 + (full / 2).mul_f64(jitter)
        }
    }
}

/// One keep-alive HTTP/1.1 connection, opened on first use and after any failure.
pub struct Connection {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    /// A connection to `target`; nothing is opened until the first `send`.
    pub fn new(target: Arc<Target>) -> Connection {
        Connection {
            target,
            sender: None,
        }
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| SendError::Timeout(CONNECT_TIMEOUT))?
            .map_err(SendError::Connect)?;
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Handshake)?;
        // The connection task ends when the sender is dropped or the peer closes; its
        // error, if any, surfaces on the next send.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer, within `timeout` overall.
    ///
    /// # Errors
    /// On connect, I/O or protocol failure, an answer over `max_body` bytes, or timeout;
    /// the connection is then dropped and the next call opens a new one.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Answer, SendError> {
        let attempt = self.send_inner(method, path, content_type, body, max_body);
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout)),
        };
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn send_inner(
        &mut self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
        max_body: usize,
    ) -> Result<Answer, SendError> {
        let reusable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = Some(self.open().await?);
        }
        let Some(sender) = self.sender.as_mut() else {
            // Just set above; kept as an error rather than a panic on this I/O path.
            return Err(SendError::Body("connection vanished".into()));
        };

        let mut builder = Request::builder()
            .method(method)
            .uri(self.target.path(path))
            .header(HOST, self.target.authority.as_str())
            .header(CONTENT_TYPE, content_type);
        if let Some(key) = &self.target.api_key {
            builder = builder.header("x-fanfinity-key", key.as_str());
        }
        let request = builder.body(Full::new(body)).map_err(SendError::Build)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(SendError::Request)?;

        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| SendError::Body(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

/// A one-shot request on a fresh connection (readiness, metrics, ClickHouse).
///
/// # Errors
/// As `Connection::send`.
pub async fn request(
    target: &Arc<Target>,
    method: Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
    max_body: usize,
) -> Result<Answer, SendError> {
    let mut connection = Connection::new(Arc::clone(target));
    let content_type = "text/plain; charset=utf-8";
    connection
        .send(method, path, content_type, body, timeout, max_body)
        .await
}

/// Waits, bounded, until `GET /readyz` answers 200 (every subcommand checks its target
/// first).
///
/// # Errors
/// When the deadline passes, with the last answer or failure.
pub async fn wait_ready(server: &Arc<Target>, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = request(
            server,
            Method::GET,
            "/readyz",
            Bytes::new(),
            Duration::from_secs(5),
            64 << 10,
        )
        .await;
        let last = match answer {
            Ok(a) if a.status == StatusCode::OK => return Ok(()),
            Ok(a) => format!("answered {}", a.status),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{} is not ready after {:?}: GET /readyz {last}",
                server.url,
                timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A batch of events, serialized once so every retry sends the same ids.
#[derive(Debug)]
pub struct Batch {
    pub ids: Vec<Uuid>,
    pub body: Bytes,
    /// Intended send time of the first attempt; latency counts from here.
    pub due: Instant,
    pub attempts: u32,
}

/// Limits of the pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Keep-alive connections, one worker each.
    pub connections: usize,
    /// Attempts per batch before giving up.
    pub max_attempts: u32,
    /// Bound on one attempt, connect to last byte.
    pub request_timeout: Duration,
    /// No retry is scheduled past this instant, and `drain` stops waiting here.
    pub deadline: Instant,
    /// Seeds the workers' retry jitter.
    pub seed: u64,
}

/// What a worker (or an open-model request) does with a batch after an attempt.
#[derive(Debug, PartialEq)]
pub enum Next {
    End(BatchEnd),
    Retry(Option<Duration>),
}

/// The body of a 2xx answer to `POST /v1/events`.
#[derive(Deserialize)]
struct Ack {
    accepted: u64,
}

/// The body of a 4xx answer.
#[derive(Deserialize)]
struct Refusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// Classifies an attempt: the key it is counted under, and what comes next.
pub fn classify(result: &Result<Answer, SendError>) -> (String, Next) {
    let answer = match result {
        Ok(answer) => answer,
        Err(e) => return (e.status_key().to_string(), Next::Retry(None)),
    };
    let status = answer.status;
    let key = status.as_str().to_string();

    if status.is_success() {
        let acked = serde_json::from_slice::<Ack>(&answer.body)
            .ok()
            .map(|a| a.accepted);
        return (key, Next::End(BatchEnd::Accepted { acked }));
    }
    let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    if retryable {
        return (key, Next::Retry(answer.retry_after));
    }
    let refusal = serde_json::from_slice::<Refusal>(&answer.body).unwrap_or(Refusal {
        error: String::new(),
        message: String::from_utf8_lossy(&answer.body)
            .chars()
            .take(200)
            .collect(),
    });
    let code = if refusal.error.is_empty() {
        format!("http_{}", status.as_u16())
    } else {
        refusal.error
    };
    let end = BatchEnd::Rejected {
        code,
        message: refusal.message,
    };
    (key, Next::End(end))
}

/// State the workers share.
struct Shared {
    target: Arc<Target>,
    settings: PoolSettings,
    stats: Arc<Stats>,
    queue_rx: Mutex<mpsc::Receiver<Batch>>,
    queue_tx: mpsc::Sender<Batch>,
    /// Batches submitted and not yet at their end.
    pending: AtomicU64,
}

/// Workers sending batches over keep-alive connections.
pub struct Pool {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `settings.connections` workers. Connections open on first use.
    pub fn start(target: Arc<Target>, settings: PoolSettings, stats: Arc<Stats>) -> Pool {
        let (queue_tx, queue_rx) = mpsc::channel(QUEUE_BATCHES);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            target,
            settings,
            stats,
            queue_rx: Mutex::new(queue_rx),
            queue_tx,
            pending: AtomicU64::new(0),
        });
        let workers = (0..shared.settings.connections)
            .map(|i| {
                let seed = shared.settings.seed.wrapping_add(i as u64);
                tokio::spawn(run_worker(Arc::clone(&shared), shutdown_rx.clone(), seed))
            })
            .collect();
        Pool {
            shared,
            shutdown,
            workers,
        }
    }

    /// Queues a batch; waits while the queue is full.
    ///
    /// # Errors
    /// If the workers are gone (the queue is closed), which only happens after `drain`.
    pub async fn submit(&self, batch: Batch) -> anyhow::Result<()> {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if self.shared.queue_tx.send(batch).await.is_err() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            anyhow::bail!("the send queue is closed");
        }
        Ok(())
    }

    /// Waits until every batch has ended or the deadline passes, then stops the workers.
    /// Returns how many batches were abandoned (still queued, waiting or in flight).
    pub async fn drain(self) -> u64 {
        while self.shared.pending.load(Ordering::SeqCst) > 0
            && Instant::now() < self.shared.settings.deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let abandoned = self.shared.pending.load(Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        abandoned
    }
}

async fn run_worker(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>, seed: u64) {
    let mut connection = Connection::new(Arc::clone(&shared.target));
    let mut rng = SmallRng::seed_from_u64(seed);
    let settings = &shared.settings;

    loop {
        // Take the next batch, unless the run is over.
        let next = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => None,
            batch = async { shared.queue_rx.lock().await.recv().await } => batch,
        };
        let Some(mut batch) = next else { break };

        // One attempt; an abandoned one counts as nothing (drain reports it).
        batch.attempts += 1;
        let result = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            result = connection.send(
                Method::POST,
                "/v1/events",
                "application/json",
                batch.body.clone(),
                settings.request_timeout,
                MAX_INGEST_ANSWER_BYTES,
            ) => result,
        };
        let (key, next) = classify(&result);
        shared
            .stats
            .record_attempt(&key, batch.attempts, batch.ids.len());

        // Retry later, or record the end.
        let end = match next {
            Next::End(end) => end,
            Next::Retry(hint) => {
                let delay = retry_delay(batch.attempts, hint, rng.random());
                let in_time = Instant::now() + delay < settings.deadline;
                if batch.attempts < settings.max_attempts && in_time {
                    let queue = shared.queue_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        // Fails only once the run is over; drain counts the batch then.
                        let _ = queue.send(batch).await;
                    });
                    continue;
                }
                BatchEnd::GivenUp
            }
        };
        let latency = Instant::now().saturating_duration_since(batch.due);
        shared.stats.record_end(&batch.ids, end, latency);
        shared.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<u64>, body: &str) -> Result<Answer, SendError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).expect("valid status"),
            retry_after: retry_after.map(Duration::from_secs),
            body: Bytes::from(body.to_string()),
        })
    }

    #[test]
    fn retry_after_is_honoured_with_a_small_spread() {
        let wait = Some(Duration::from_secs(2));
        assert_eq!(retry_delay(1, wait, 0.0), Duration::from_secs(2));
        let spread = retry_delay(1, wait, 0.999);
        assert!(spread > Duration::from_secs(2) && spread < Duration::from_millis(2250));
        let huge = Some(Duration::from_secs(3600));
        assert_eq!(retry_delay(1, huge, 0.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(retry_delay(1, None, 0.0), Duration::from_millis(25));
        assert_eq!(retry_delay(2, None, 0.0), Duration::from_millis(50));
        assert_eq!(retry_delay(3, None, 0.999).as_millis(), 199);
        assert_eq!(retry_delay(30, None, 1.0), BACKOFF_MAX);
    }

    #[test]
    fn parses_numeric_retry_after_only() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn classifies_answers() {
        let ok = answer(202, None, r#"{"accepted": 25, "event_ids": []}"#);
        let end = Next::End(BatchEnd::Accepted { acked: Some(25) });
        assert_eq!(classify(&ok), ("202".to_string(), end));

        let busy = answer(503, Some(1), "");
        let retry = Next::Retry(Some(Duration::from_secs(1)));
        assert_eq!(classify(&busy), ("503".to_string(), retry));

        let bad = answer(400, None, r#"{"error": "invalid_event", "message": "ts"}"#);
        let (key, next) = classify(&bad);
        assert_eq!(key, "400");
        let rejected = BatchEnd::Rejected {
            code: "invalid_event".into(),
            message: "ts".into(),
        };
        assert_eq!(next, Next::End(rejected));

        let gone = Err(SendError::Timeout(Duration::from_secs(1)));
        assert_eq!(classify(&gone), ("timeout".to_string(), Next::Retry(None)));
    }

    #[test]
    fn a_4xx_without_json_keeps_its_status_as_code() {
        let (_, next) = classify(&answer(413, None, "too big"));
        let Next::End(BatchEnd::Rejected { code, message }) = next else {
            panic!("413 is a rejection");
        };
        assert_eq!((code.as_str(), message.as_str()), ("http_413", "too big"));
    }
}
