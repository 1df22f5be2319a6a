//! The baseline for `benches/compare`: fanfinity's `POST /v1/events` written the way most
//! Rust services are. A tokio multi-thread runtime, axum, serde_json into a typed struct,
//! the checks a careful service writes by hand, and rdkafka's `FutureProducer`, answering
//! 202 once every record of the request is delivered. Nothing here is tuned past what a
//! reviewer would ask for; see README.md beside this crate for what it leaves out.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::AsyncRuntime;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// fanfinity's `http.max_body_bytes` and `http.max_events_per_request` defaults.
const MAX_BODY_BYTES: usize = 1024 * 1024;
const MAX_EVENTS: usize = 1000;
/// fanfinity's `kafka.queue_max_messages` default; `/readyz` fails past 80 % of it.
const QUEUE_MAX_MESSAGES: usize = 500_000;
/// 2000-01-01T00:00:00Z and 2099-12-31T23:59:59.999Z in epoch milliseconds.
const TS_RANGE_MS: std::ops::RangeInclusive<i64> = 946_684_800_000..=4_102_444_799_999;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    #[arg(long, default_value = "fanfinity.events")]
    topic: String,
}

/// rdkafka's own tokio runtime adapter (its `tokio` feature), written out here: turning
/// that feature on in this workspace member would switch it on for the root crate's rdkafka
/// too (cargo unifies features), rebuilding it whenever the two are built apart.
struct TokioRuntime;

impl AsyncRuntime for TokioRuntime {
    type Delay = Pin<Box<tokio::time::Sleep>>;

    fn spawn<T: Future<Output = ()> + Send + 'static>(task: T) {
        tokio::spawn(task);
    }

    fn delay_for(duration: Duration) -> Self::Delay {
        Box::pin(tokio::time::sleep(duration))
    }
}

type KafkaProducer = FutureProducer<rdkafka::client::DefaultClientContext, TokioRuntime>;

struct AppState {
    producer: KafkaProducer,
    topic: String,
}

#[derive(Deserialize, Serialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum EventType {
    Reaction,
    Cheer,
    GoalCelebration,
    PollVote,
    Chat,
    Share,
    View,
}

/// An event as clients send it. Unknown fields are ignored, as fanfinity does.
#[derive(Deserialize)]
struct IncomingEvent {
    event_id: Option<Uuid>,
    match_id: String,
    user_id: String,
    #[serde(rename = "type")]
    event_type: EventType,
    ts: Option<Value>,
    team: Option<String>,
    payload: Option<Map<String, Value>>,
}

/// The record written to Kafka: the same fields as fanfinity's `EventRecord`.
#[derive(Serialize)]
struct EventRecord {
    event_id: Uuid,
    match_id: String,
    user_id: String,
    #[serde(rename = "type")]
    event_type: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    team: Option<String>,
    /// The payload object as compact JSON text.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    received_at: i64,
}

/// An error answer: status plus fanfinity's `{"error", "message"}` body.
struct ApiError(StatusCode, &'static str, String, Vec<Value>);

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(status, code, message.into(), Vec::new())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.1, "message": self.2 });
        if !self.3.is_empty() {
            body["invalid_events"] = json!(self.3.len());
            body["details"] = Value::Array(self.3);
        }
        (self.0, Json(body)).into_response()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    // The same producer settings as fanfinity's defaults (docs/configuration.md):
    // idempotent, acks=all, lz4, linger.ms=5, batch.size 1 MiB, message.timeout.ms 3000,
    // queue 500,000 messages / 512 MiB.
    let producer: KafkaProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1048576")
        .set("message.timeout.ms", "3000")
        .set(
            "queue.buffering.max.messages",
            QUEUE_MAX_MESSAGES.to_string(),
        )
        .set("queue.buffering.max.kbytes", "524288")
        .create()
        .context("cannot create the Kafka producer")?;
    let state = Arc::new(AppState {
        producer,
        topic: args.topic,
    });

    let app = Router::new()
        .route("/v1/events", post(post_events))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot bind {}", args.listen))?;
    tracing::info!(listen = %args.listen, "baseline listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await
        .context("server failed")?;
    state
        .producer
        .flush(Duration::from_secs(10))
        .context("producer flush at shutdown")?;
    Ok(())
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let queued = usize::try_from(state.producer.in_flight_count()).unwrap_or(0);
    let ready = queued < QUEUE_MAX_MESSAGES * 8 / 10;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": ready, "queue_depth": queued })),
    )
        .into_response()
}

/// `POST /v1/events`: one object, an array, or NDJSON; all-or-nothing; 202 after every
/// record is delivered.
async fn post_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let events = parse_body(&headers, &body)?;
    let received_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut records = Vec::with_capacity(events.len());
    let mut problems = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        match validate(event, received_at) {
            Ok(record) => records.push(record),
            Err((field, reason)) => {
                problems.push(json!({ "index": index, "field": field, "reason": reason }))
            }
        }
    }
    if !problems.is_empty() {
        let message = format!(
            "{} events are invalid; nothing was accepted",
            problems.len()
        );
        problems.truncate(100);
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_events",
            message,
            problems,
        ));
    }

    // Enqueue every record first, then wait for the deliveries, so one request costs one
    // linger.ms, not one per event (what `join_all` over `send` does, without the crate).
    let unavailable =
        |err: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "kafka_unavailable", err);
    let mut deliveries = Vec::with_capacity(records.len());
    for record in &records {
        let payload = serde_json::to_vec(record).map_err(|e| unavailable(e.to_string()))?;
        let kafka_record = FutureRecord::to(&state.topic)
            .key(&record.match_id)
            .payload(&payload);
        let delivery = state
            .producer
            .send_result(kafka_record)
            .map_err(|(err, _)| unavailable(format!("enqueue failed: {err}")))?;
        deliveries.push(delivery);
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(unavailable(format!("delivery failed: {err}"))),
            Err(_) => return Err(unavailable("delivery canceled".into())),
        }
    }

    let ids: Vec<Uuid> = records.iter().map(|r| r.event_id).collect();
    let body = json!({ "accepted": ids.len(), "event_ids": ids });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Splits the body into events by content type and first byte.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Vec<IncomingEvent>, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "the body is empty",
        ));
    }
    let events: Vec<IncomingEvent> = if content_type.contains("ndjson") {
        trimmed
            .split(|&b| b == b'\n')
            .filter(|line| !line.trim_ascii().is_empty())
            .map(serde_json::from_slice)
            .collect::<Result<_, _>>()
            .map_err(malformed)?
    } else if trimmed.starts_with(b"[") {
        serde_json::from_slice(trimmed).map_err(malformed)?
    } else {
        vec![serde_json::from_slice(trimmed).map_err(malformed)?]
    };
    if events.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no_events",
            "no events in the body",
        ));
    }
    if events.len() > MAX_EVENTS {
        let message = format!("{} events; at most {MAX_EVENTS} per request", events.len());
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            message,
        ));
    }
    Ok(events)
}

/// fanfinity's field rules (README's table), written as a service typically would.
fn validate(
    event: IncomingEvent,
    received_at: i64,
) -> Result<EventRecord, (&'static str, &'static str)> {
    let id_ok = (1..=64).contains(&event.match_id.len())
        && event
            .match_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !id_ok {
        return Err(("match_id", "must be 1-64 chars of [A-Za-z0-9_.:-]"));
    }
    if !text_ok(&event.user_id, 128) {
        return Err(("user_id", "must be 1-128 chars without control characters"));
    }
    if let Some(team) = &event.team {
        if !text_ok(team, 64) {
            return Err(("team", "must be 1-64 chars without control characters"));
        }
    }
    const TS_RULE: &str = "must be RFC 3339 with a zone or epoch ms in 2000-2099";
    let ts = match &event.ts {
        None | Some(Value::Null) => None,
        Some(raw) => Some(
            epoch_ms(raw)
                .filter(|ms| TS_RANGE_MS.contains(ms))
                .ok_or(("ts", TS_RULE))?,
        ),
    };
    let payload = match &event.payload {
        None => None,
        Some(map) => {
            let text = serde_json::to_string(map).map_err(|_| ("payload", "is not valid JSON"))?;
            if text.len() > 4096 {
                return Err(("payload", "must be at most 4 KiB serialized"));
            }
            Some(text)
        }
    };
    Ok(EventRecord {
        event_id: event.event_id.unwrap_or_else(Uuid::now_v7),
        match_id: event.match_id,
        user_id: event.user_id,
        event_type: event.event_type,
        ts,
        team: event.team,
        payload,
        received_at,
    })
}

/// An integer of epoch milliseconds, or RFC 3339 text with a zone.
fn epoch_ms(raw: &Value) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    match raw {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => time::OffsetDateTime::parse(s, &Rfc3339)
            .ok()
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64),
        _ => None,
    }
}

fn text_ok(text: &str, max_chars: usize) -> bool {
    let chars = text.chars().count();
    (1..=max_chars).contains(&chars) && !text.chars().any(char::is_control)
}
