//! Routes one HTTP request and builds its answer.
//!
//! Routes: `POST /v1/events`; the analytics API under `GET /v1/matches` (see
//! `query::api`); the match page at `GET /` and `GET /matches/{id}`; `GET /healthz`,
//! `GET /readyz`, `GET /metrics`. Every failure goes through [`IngestError`], which owns
//! the status and JSON body; this module only decides which error applies.
//!
//! In the no-op benchmark server (no producer) an event post is read and answered 202
//! without being decoded or produced; see [`discard_events`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use tracing::{debug, warn};
use uuid::Uuid;

use super::body::{read_body, BodyLimits, ContentCoding};
use super::decode::{decode_events, outgoing_records, BodyFormat};
use super::error::IngestError;
use super::rate_limit::{client_ip, KeyCharge, PeerAddr};
use super::request_body::RequestBody;
use super::state::{IngestShared, Listener, ShardContext};
use crate::auth::{Presented, Role};
use crate::kafka::producer::ProduceError;
use crate::metrics::prometheus::{ProducerView, Sources};
use crate::metrics::shard::{RequestTimer, Route};
use crate::query::api::{AnalyticsRequest, Endpoint};
use crate::query::QueryError;
use crate::sink::status::SinkReport;

/// What every handler returns.
pub type HttpResponse = Response<Full<Bytes>>;

/// Serves one request on a shard, recording its latency and status on every exit.
pub async fn handle(ctx: &ShardContext, req: Request<RequestBody>) -> HttpResponse {
    let mut timer = RequestTimer::start(&ctx.metrics, Route::Other);
    let origin = req.headers().get(ORIGIN).cloned();
    let (route, outcome) = dispatch(ctx, req).await;
    timer.set_route(route);
    let (mut response, accepted) = match outcome {
        Ok(answer) => answer,
        Err(err) => (error_response(&err, &ctx.shared), 0),
    };
    if route == Route::Events {
        ctx.cors.decorate(origin.as_ref(), response.headers_mut());
    }
    timer.finish(response.status().as_u16(), accepted);
    response
}

type Outcome = Result<(HttpResponse, u64), IngestError>;

async fn dispatch(ctx: &ShardContext, req: Request<RequestBody>) -> (Route, Outcome) {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if !listener_serves(ctx, &req, &segments) {
        let (method, path) = (method.to_string(), path.clone());
        return (Route::Other, Err(IngestError::NotFound { method, path }));
    }
    let not_allowed = |allow| {
        Err(IngestError::MethodNotAllowed {
            method: method.to_string(),
            path: path.clone(),
            allow,
        })
    };
    match (segments.as_slice(), &method) {
        (["v1", "events"], &Method::POST) => {
            match limit_client(ctx, &req).and_then(|()| authorize(ctx, &req, Role::Ingest)) {
                Ok(key_id) => (Route::Events, post_charged_events(ctx, req, key_id).await),
                Err(err) => (Route::Events, Err(err)),
            }
        }
        (["v1", "events"], &Method::OPTIONS) if ctx.cors.is_on() => {
            let preflight = ctx.cors.preflight(req.headers().get(ORIGIN));
            (Route::Events, preflight.map(|answer| (answer, 0)))
        }
        (["v1", "events"], _) if ctx.cors.is_on() => (Route::Events, not_allowed("OPTIONS, POST")),
        (["v1", "events"], _) => (Route::Events, not_allowed("POST")),
        ([] | [""] | ["matches", _], &Method::GET) => (Route::Other, Ok((match_page(), 0))),
        ([] | [""] | ["matches", _], _) => (Route::Other, not_allowed("GET")),
        (["healthz"], &Method::GET) => (
            Route::Health,
            Ok((json(StatusCode::OK, &Health { status: "ok" }), 0)),
        ),
        (["readyz"], &Method::GET) => (Route::Health, Ok((readiness(&ctx.shared), 0))),
        (["metrics"], &Method::GET) => (Route::Metrics, Ok((prometheus(&ctx.shared), 0))),
        (["healthz"] | ["readyz"] | ["metrics"], _) => (Route::Other, not_allowed("GET")),
        (segments, method) => match Endpoint::from_path(segments) {
            Some(_) if method != Method::GET => (Route::Query, not_allowed("GET")),
            Some((endpoint, match_id)) => {
                if let Err(err) =
                    limit_client(ctx, &req).and_then(|()| authorize(ctx, &req, Role::Read))
                {
                    return (Route::Query, Err(err));
                }
                let request = AnalyticsRequest::parse(endpoint, match_id, req.uri().query());
                (Route::Query, analytics(ctx, request).await)
            }
            None => (
                Route::Other,
                Err(IngestError::NotFound {
                    method: method.to_string(),
                    path: path.clone(),
                }),
            ),
        },
    }
}

/// With `http.admin_listen` set, `/metrics`, `/healthz` and `/readyz` are served on the
/// admin listener only, and it serves nothing else; without it, everything is public.
fn listener_serves(ctx: &ShardContext, req: &Request<RequestBody>, segments: &[&str]) -> bool {
    let operational = matches!(segments, ["metrics"] | ["healthz"] | ["readyz"]);
    let admin = req.extensions().get::<Listener>() == Some(&Listener::Admin);
    match ctx.shared.config.http.admin_listen {
        None => true,
        Some(_) => operational == admin,
    }
}

/// Checks the request's key for `role` before anything else is read, so a request
/// without the right key is refused without its body (and, with `Expect:
/// 100-continue`, without asking for it). Returns the key's id, `None` when auth is off.
fn authorize(
    ctx: &ShardContext,
    req: &Request<RequestBody>,
    role: Role,
) -> Result<Option<String>, IngestError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let presented = Presented {
        authorization: header("authorization"),
        api_key: header("x-fanfinity-key"),
    };
    match ctx.keys.check(&ctx.shared.auth, presented, role) {
        Ok(key_id) => Ok(key_id),
        Err(denied) => {
            // The key id is public; the key itself is never logged.
            debug!(shard = ctx.shard, role = %role, reason = %denied, "request not authorized");
            Err(IngestError::Denied(denied))
        }
    }
}

/// Charges one API request to its client's address (see `rate_limit.rs`). Runs before
/// the key is checked, so a flood from one address is refused before any key is hashed.
fn limit_client(ctx: &ShardContext, req: &Request<RequestBody>) -> Result<(), IngestError> {
    let peer = req.extensions().get::<PeerAddr>().copied();
    let ip = client_ip(peer, req.headers(), ctx.limits.trust_forwarded_for);
    ctx.limits.check_ip(ip, Instant::now()).map_err(|limited| {
        debug!(
            shard = ctx.shard,
            client = ?ip,
            retry_after_secs = limited.retry_after_secs,
            "client over its request rate"
        );
        IngestError::from(limited)
    })
}

/// Charges an event post to its key (one token now, one per further event once the body
/// is decoded), then serves it. A request the server failed (5xx) gets its tokens back:
/// the client will retry it and should not pay twice.
async fn post_charged_events(
    ctx: &ShardContext,
    req: Request<RequestBody>,
    key_id: Option<String>,
) -> Outcome {
    let charge = ctx
        .limits
        .charge_key(key_id, Instant::now())
        .inspect_err(|limited| {
            debug!(
                shard = ctx.shard,
                retry_after_secs = limited.retry_after_secs,
                "key over its event rate"
            );
        })?;
    let outcome = post_events(ctx, req, &charge).await;
    if let Err(err) = &outcome {
        if err.status_and_code().0.is_server_error() {
            charge.refund(Instant::now());
        }
    }
    outcome
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

#[derive(Serialize)]
struct Accepted<'a> {
    accepted: usize,
    event_ids: &'a [Uuid],
}

/// `POST /v1/events`: validate everything, produce everything, answer 202 only once
/// Kafka acknowledged every record.
async fn post_events(
    ctx: &ShardContext,
    req: Request<RequestBody>,
    charge: &KeyCharge<'_>,
) -> Outcome {
    let shared = &ctx.shared;
    if shared.stopping.load(Ordering::Relaxed) {
        return Err(IngestError::ShuttingDown);
    }
    let http = &shared.config.http;
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let format = BodyFormat::from_content_type(content_type)?;
    let coding = ContentCoding::from_headers(req.headers())?;
    let Some(producer) = shared.producer.as_deref() else {
        return discard_events(ctx, req, coding).await;
    };
    // Refuse early when Kafka cannot take anything, before reading the body.
    producer.check_capacity(1)?;
    let holds = declared_length(&req).map_or(http.max_body_bytes, |len| {
        usize::try_from(len).map_or(http.max_body_bytes, |len| len.min(http.max_body_bytes))
    });
    let _permit = ctx
        .inflight
        .admit(holds)
        .map_err(|full| IngestError::ShardBusy {
            shard: ctx.shard,
            requests: full.requests,
            bytes: full.bytes,
        })?;

    let limits = BodyLimits {
        max_body_bytes: http.max_body_bytes,
        read_timeout: Duration::from_millis(http.body_read_timeout_ms),
    };
    let declared = declared_length(&req);
    let body = read_body(req.into_body(), declared, coding, limits).await?;
    let received_at_ms = now_ms();
    let records = decode_events(&body, format, http.max_events_per_request, received_at_ms)?;
    charge.charge_events(records.len(), Instant::now())?;

    let outgoing = outgoing_records(&records, shared.config.kafka.max_message_bytes)?;
    let ack = producer.send_batch(&outgoing)?;
    let timeout = Duration::from_millis(http.ack_timeout_ms);
    let delivered = glommio::timer::timeout(timeout, async { Ok(ack.await) }).await;
    match delivered {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err.into()),
        Err(_) => {
            return Err(ProduceError::Timeout {
                timeout_ms: http.ack_timeout_ms,
            }
            .into())
        }
    }

    let ids: Vec<Uuid> = records.iter().map(|r| r.event_id).collect();
    debug!(
        shard = ctx.shard,
        events = ids.len(),
        "request acknowledged by kafka"
    );
    let body = Accepted {
        accepted: ids.len(),
        event_ids: &ids,
    };
    Ok((json(StatusCode::ACCEPTED, &body), ids.len() as u64))
}

#[derive(Serialize)]
struct Discarded {
    accepted: usize,
    noop: bool,
}

/// The no-op benchmark server's `POST /v1/events` (no producer): reads the body within
/// the same limits and deadline as the real path, then answers 202
/// `{"accepted":0,"noop":true}` without decoding it. What it leaves out (decoding,
/// validation, encoding, Kafka) is exactly what benches/compare sets against the HTTP
/// layer's cost, so nothing else may be skipped here.
async fn discard_events(
    ctx: &ShardContext,
    req: Request<RequestBody>,
    coding: ContentCoding,
) -> Outcome {
    let http = &ctx.shared.config.http;
    let limits = BodyLimits {
        max_body_bytes: http.max_body_bytes,
        read_timeout: Duration::from_millis(http.body_read_timeout_ms),
    };
    let declared = declared_length(&req);
    read_body(req.into_body(), declared, coding, limits).await?;
    let body = Discarded {
        accepted: 0,
        noop: true,
    };
    Ok((json(StatusCode::ACCEPTED, &body), 0))
}

/// The body length the client announced, if any.
fn declared_length(req: &Request<RequestBody>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Answers an analytics request through the shard's cache.
async fn analytics(ctx: &ShardContext, request: Result<AnalyticsRequest, QueryError>) -> Outcome {
    let request = request?;
    let Some(query) = ctx.shared.query.as_ref().map(Arc::clone) else {
        return Err(QueryError::RuntimeGone.into());
    };
    let body = ctx
        .answers
        .get(request.cache_key(), move || async move {
            query.answer(request).await
        })
        .await?;
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok((response, 0))
}

/// The live match page: one self-contained file, compiled in.
const MATCH_PAGE: &str = include_str!("../../assets/match.html");

/// `GET /` and `GET /matches/{id}`: the page reads the match from its own URL. The
/// policy allows its inline script and styles and API calls to this origin only.
fn match_page() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(MATCH_PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    /// Shutting down: the shards refuse new events and stop accepting connections, so a
    /// load balancer should send nothing more here.
    draining: bool,
    /// `null` in the no-op benchmark server, which has no producer.
    kafka: Option<KafkaReport>,
    /// `null` when this process runs no sink (`fanfinity ingest`).
    sink: Option<SinkReport>,
}

#[derive(Serialize)]
struct KafkaReport {
    up: bool,
    queue_depth: usize,
    queue_limit: usize,
    last_error: Option<String>,
}

/// `GET /readyz`: 200 when this node should receive events, 503 with `"draining": true`
/// from the moment shutdown begins. ClickHouse's state is shown but does not count: Kafka
/// holds events while the sink is behind.
fn readiness(shared: &Arc<IngestShared>) -> HttpResponse {
    let kafka = shared.producer.as_deref().map(|producer| {
        let health = producer.health();
        KafkaReport {
            up: health.is_up(),
            queue_depth: producer.queue_depth(),
            queue_limit: producer.ready_limit(),
            last_error: health.last_error(),
        }
    });
    let draining = shared.stopping.load(Ordering::Relaxed);
    let kafka_ready = kafka
        .as_ref()
        .is_none_or(|k| k.up && k.queue_depth < k.queue_limit);
    let ready = kafka_ready && !draining;
    let body = Readiness {
        ready,
        draining,
        kafka,
        sink: shared.sink.as_ref().map(|s| s.report()),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

fn prometheus(shared: &Arc<IngestShared>) -> HttpResponse {
    let text = crate::metrics::render(&Sources {
        shards: &shared.shard_metrics,
        producer: shared.producer.as_deref().map(|producer| ProducerView {
            kafka_up: producer.health().is_up(),
            queue_depth: producer.queue_depth(),
            queue_limit: producer.ready_limit(),
            resets: producer.health().resets.load(Ordering::Relaxed),
        }),
        sink: shared.sink.as_deref(),
    });
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn error_response(err: &IngestError, shared: &Arc<IngestShared>) -> HttpResponse {
    let (status, code) = err.status_and_code();
    if status.is_server_error() {
        warn!(error = %err, code, status = status.as_u16(), "request refused");
    }
    let mut response = Response::new(Full::new(Bytes::from(err.body())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let IngestError::MethodNotAllowed { allow, .. } = err {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    for (name, value) in err.extra_headers() {
        headers.insert(name.clone(), HeaderValue::from_static(value));
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"fanfinity\""),
        );
    }
    if let IngestError::RateLimited(limited) = err {
        headers.insert(RETRY_AFTER, HeaderValue::from(limited.retry_after_secs));
    }
    if err.is_retryable() {
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from(shared.config.http.retry_after_secs),
        );
    }
    response
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> HttpResponse {
    let bytes = sonic_rs::to_vec(body).unwrap_or_else(|err| {
        format!(r#"{{"error":"internal","message":"cannot encode answer: {err}"}}"#).into_bytes()
    });
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
