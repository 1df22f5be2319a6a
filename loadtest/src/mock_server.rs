//! A throwaway stand-in for the fanfinity server and ClickHouse, for the loadtest's tests.
//!
//! It speaks just enough of the contract: `GET /readyz` and `/healthz`, `POST /v1/events`
//! (one object, an array or NDJSON; checks each event against the API rules on its own,
//! answers 202 with the ids, and on a schedule answers 503 or drops the connection),
//! `GET /v1/matches/{id}/metrics`, and ClickHouse's `POST /` for the two queries
//! `verify.rs` sends. It listens on 127.0.0.1, port 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Misbehaviour schedule, counted over `POST /v1/events` requests (0 = never).
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Every n-th request is answered 503 with `Retry-After` 0 or 1 (alternating).
    pub unavailable_every: u64,
    /// Every n-th request is stored, then its connection is closed without an answer.
    pub drop_every: u64,
    /// Every n-th request is answered 202 but not stored (a server that loses data).
    pub lose_every: u64,
}

/// One stored event.
#[derive(Debug, Clone)]
pub struct Stored {
    pub match_id: String,
    pub user_id: String,
    pub kind: String,
    pub ts: i64,
}

/// What the mock has seen.
#[derive(Debug, Default)]
pub struct MockState {
    pub requests: u64,
    pub events: HashMap<Uuid, Stored>,
    /// Rows per match, duplicates included (what ClickHouse's `count()` would say).
    pub rows: HashMap<String, u64>,
    /// Events stored again under an id already held.
    pub redelivered: u64,
    pub invalid_events: u64,
    pub lost_events: usize,
}

impl MockState {
    pub fn distinct_ids(&self) -> usize {
        self.events.len()
    }
}

type Shared = Arc<Mutex<MockState>>;

pub struct MockServer {
    addr: SocketAddr,
    state: Shared,
    accept: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl MockServer {
    pub async fn start(config: MockConfig) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 for the mock");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let state: Shared = Arc::default();
        let accept_state = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&accept_state);
                let config = config.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| handle(req, Arc::clone(&state), config.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockServer {
            addr,
            state,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn lock(state: &Shared) -> MutexGuard<'_, MockState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn handle(
    req: Request<Incoming>,
    state: Shared,
    config: MockConfig,
) -> Result<Response<Full<Bytes>>, io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();

    match (method, path.as_str()) {
        (Method::GET, "/readyz") => Ok(reply(StatusCode::OK, "ready")),
        (Method::GET, "/healthz") => Ok(reply(StatusCode::OK, "ok")),
        (Method::POST, "/v1/events") => ingest(&body, &state, &config),
        (Method::POST, "/") => Ok(clickhouse(&body, &state)),
        (Method::GET, p) if p.starts_with("/v1/matches/") && p.ends_with("/metrics") => {
            let id = &p["/v1/matches/".len()..p.len() - "/metrics".len()];
            Ok(metrics(id, &query, &state))
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#)),
    }
}

/// The API's rules for one event, written out again independently of `events.rs`.
fn check_event(e: &Value) -> Result<(Uuid, Stored), String> {
    let text = |key: &str| e.get(key).and_then(Value::as_str).unwrap_or("");
    let id = Uuid::parse_str(text("event_id")).map_err(|_| "event_id".to_string())?;
    let match_id = text("match_id");
    let charset_ok = match_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if match_id.is_empty() || match_id.len() > 64 || !charset_ok {
        return Err("match_id".into());
    }
    let user_id = text("user_id");
    if user_id.is_empty() || user_id.chars().count() > 128 {
        return Err("user_id".into());
    }
    let kind = text("type");
    let kinds = [
        "reaction",
        "cheer",
        "goal_celebration",
        "poll_vote",
        "chat",
        "share",
        "view",
    ];
    if !kinds.contains(&kind) {
        return Err("type".into());
    }
    let ts = e.get("ts").and_then(Value::as_i64).ok_or("ts")?;
    if text("team").is_empty() {
        return Err("team".into());
    }
    let payload = e
        .get("payload")
        .filter(|p| p.is_object())
        .ok_or("payload")?;
    if payload.to_string().len() > 4096 {
        return Err("payload too large".into());
    }
    let stored = Stored {
        match_id: match_id.to_string(),
        user_id: user_id.to_string(),
        kind: kind.to_string(),
        ts,
    };
    Ok((id, stored))
}

fn ingest(
    body: &[u8],
    state: &Shared,
    config: &MockConfig,
) -> Result<Response<Full<Bytes>>, io::Error> {
    let due = |every: u64, n: u64| every > 0 && n.is_multiple_of(every);
    let mut s = lock(state);
    s.requests += 1;
    let n = s.requests;

    // One object, an array, or NDJSON, like the real server.
    let parsed = match serde_json::from_slice(body) {
        Ok(Value::Array(events)) => Some(events),
        Ok(one @ Value::Object(_)) => Some(vec![one]),
        _ => body
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| {
                serde_json::from_slice::<Value>(line)
                    .ok()
                    .filter(Value::is_object)
            })
            .collect::<Option<Vec<Value>>>()
            .filter(|events| !events.is_empty()),
    };
    let Some(events) = parsed else {
        let refusal = r#"{"error":"invalid_json","message":"body is not JSON or NDJSON"}"#;
        return Ok(reply(StatusCode::BAD_REQUEST, refusal));
    };
    let mut checked = Vec::with_capacity(events.len());
    for e in &events {
        match check_event(e) {
            Ok(ok) => checked.push(ok),
            Err(field) => {
                s.invalid_events += 1;
                let refusal = json!({"error": "invalid_event", "message": field});
                return Ok(reply(StatusCode::BAD_REQUEST, refusal.to_string()));
            }
        }
    }

    if due(config.unavailable_every, n) {
        let wait = if (n / config.unavailable_every).is_multiple_of(2) {
            "0"
        } else {
            "1"
        };
        let mut response = reply(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"overloaded"}"#);
        let value = hyper::header::HeaderValue::from_static(wait);
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, value);
        return Ok(response);
    }
    let ids: Vec<String> = checked.iter().map(|(id, _)| id.to_string()).collect();
    if due(config.lose_every, n) {
        s.lost_events += checked.len();
    } else {
        for (id, stored) in checked {
            *s.rows.entry(stored.match_id.clone()).or_default() += 1;
            if s.events.insert(id, stored).is_some() {
                s.redelivered += 1;
            }
        }
    }
    if due(config.drop_every, n) {
        return Err(io::Error::other("mock drops this connection"));
    }
    let ack = json!({"accepted": ids.len(), "event_ids": ids});
    Ok(reply(StatusCode::ACCEPTED, ack.to_string()))
}

/// Answers the two queries of `verify.rs`, like ClickHouse's HTTP interface would.
fn clickhouse(body: &[u8], state: &Shared) -> Response<Full<Bytes>> {
    let sql = String::from_utf8_lossy(body);
    let Some(match_id) = sql
        .split("match_id = '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
    else {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "Code: 62, syntax error");
    };
    let s = lock(state);
    let ids: Vec<&Uuid> = s
        .events
        .iter()
        .filter(|(_, e)| e.match_id == match_id)
        .map(|(id, _)| id)
        .collect();
    if sql.contains("uniqExact(event_id)") {
        let rows = s.rows.get(match_id).copied().unwrap_or(0);
        return reply(StatusCode::OK, format!("{rows}\t{}\n", ids.len()));
    }
    if sql.contains("DISTINCT toString(event_id)") {
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        return reply(StatusCode::OK, text);
    }
    reply(StatusCode::INTERNAL_SERVER_ERROR, "Code: 46, unknown query")
}

fn metrics(match_id: &str, query: &str, state: &Shared) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let from = param("from").unwrap_or(i64::MIN);
    let to = param("to").unwrap_or(i64::MAX);

    let s = lock(state);
    let mut fans = HashSet::new();
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
    let mut total = 0u64;
    for e in s.events.values() {
        if e.match_id != match_id || e.ts < from || e.ts >= to {
            continue;
        }
        total += 1;
        fans.insert(e.user_id.as_str());
        *by_type.entry(e.kind.clone()).or_default() += 1;
        *buckets.entry(e.ts - e.ts.rem_euclid(60_000)).or_default() += 1;
    }
    let timeline: Vec<Value> = buckets
        .iter()
        .map(|(t, n)| json!({"t": t, "events": n, "by_type": {}}))
        .collect();
    let answer = json!({
        "match_id": match_id,
        "total_events": total,
        "unique_fans": fans.len(),
        "by_type": by_type,
        "bucket_seconds": 60,
        "timeline": timeline,
        "newest_received_at_ms": null,
        // As the analytics answers do (docs/analytics.md); `loadtest poll` reads it.
        "generated_at_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    });
    reply(StatusCode::OK, answer.to_string())
}
