//! Everything a request can fail with, and the one place each failure becomes an HTTP
//! status and a JSON body `{"error": code, "message": ..., ...}`.

use http::StatusCode;
use serde::Serialize;

use super::rate_limit::RateLimited;
use super::validate::FieldError;
use crate::auth::Denied;
use crate::kafka::producer::ProduceError;
use crate::query::QueryError;

/// Most field errors listed in one 400 answer; the total is still reported.
pub const MAX_LISTED_FIELD_ERRORS: usize = 100;

/// A request that cannot be answered 2xx.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        method: String,
        path: String,
        /// The `Allow` header value.
        allow: &'static str,
    },
    #[error(
        "content type {content_type:?} is not supported; \
         use application/json, text/plain, application/x-ndjson or application/ndjson"
    )]
    UnsupportedMediaType { content_type: String },
    #[error("request body exceeds {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("request holds {count} events, more than the limit of {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("request body is empty")]
    EmptyBody,
    #[error("request holds no events")]
    NoEvents,
    #[error("malformed JSON: {detail}")]
    MalformedJson { detail: String },
    #[error("{invalid} of {total} events are invalid; nothing was accepted")]
    InvalidEvents {
        invalid: usize,
        total: usize,
        errors: Vec<FieldError>,
    },
    #[error("cannot read the request body: {detail}")]
    BodyRead { detail: String },
    /// The body stopped arriving: 408, and the connection is closed.
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    /// A `Content-Encoding` other than `gzip` or `identity` (415, naming it).
    #[error("content encoding {encoding:?} is not supported; send gzip or no encoding")]
    UnsupportedEncoding { encoding: String },
    /// The body is not what its `Content-Encoding` says (a plain body sent as gzip, or a
    /// truncated or corrupt stream).
    #[error("body is not valid {encoding}: {detail}")]
    BadEncoding {
        encoding: &'static str,
        detail: String,
    },
    /// A compressed body that inflates past `http.max_body_bytes`; inflating stops there.
    #[error("decompressed request body exceeds {limit_bytes} bytes")]
    DecompressedTooLarge { limit_bytes: usize },
    /// One event whose Kafka record would pass `kafka.max_message_bytes`; refused here
    /// rather than accepted and then failed by the producer.
    #[error(
        "event {index} would be a Kafka record of {record_bytes} bytes, more than \
         kafka.max_message_bytes ({limit_bytes})"
    )]
    EventTooLarge {
        index: usize,
        record_bytes: usize,
        limit_bytes: usize,
    },
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("shard {shard} is at its in-flight limit ({requests} requests, {bytes} body bytes)")]
    ShardBusy {
        shard: usize,
        requests: usize,
        bytes: usize,
    },
    /// A key or address over its rate limit (429 with `Retry-After`).
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// A CORS preflight from an origin not in `http.cors_allowed_origins`.
    #[error("this origin may not post events from a browser")]
    CorsOriginRefused,
    /// Answered by the connection layer in place of hyper's bodiless parse-error answers
    /// (see `ingest/connection_io.rs`).
    #[error("the request is not valid HTTP/1.1")]
    MalformedRequest,
    /// RFC 9112, section 6.3: both framings at once is a request-smuggling shape.
    #[error("the request has both Content-Length and Transfer-Encoding")]
    ConflictingLength,
    #[error("the request head exceeds the server's header size or count limits")]
    HeadersTooLarge,
    #[error("the request target is too long")]
    UriTooLong,
    #[error("the request head did not arrive within {timeout_ms} ms")]
    HeaderTimeout { timeout_ms: u64 },
    #[error("shard {shard} already serves {limit} connections")]
    TooManyConnections { shard: usize, limit: usize },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_events: Option<usize>,
    /// The query parameter an `invalid_parameter` answer is about (`query` for an unknown
    /// one), so a client can point at the field without parsing `message`.
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'static str>,
}

impl IngestError {
    /// The HTTP status and the stable machine-readable code clients switch on.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            IngestError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            IngestError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            IngestError::UnsupportedMediaType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            IngestError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            IngestError::TooManyEvents { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events"),
            IngestError::EmptyBody => (StatusCode::BAD_REQUEST, "empty_body"),
            IngestError::NoEvents => (StatusCode::BAD_REQUEST, "no_events"),
            IngestError::MalformedJson { .. } => (StatusCode::BAD_REQUEST, "malformed_json"),
            IngestError::InvalidEvents { .. } => (StatusCode::BAD_REQUEST, "invalid_events"),
            IngestError::BodyRead { .. } => (StatusCode::BAD_REQUEST, "body_read_failed"),
            IngestError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            IngestError::UnsupportedEncoding { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding")
            }
            IngestError::BadEncoding { .. } => (StatusCode::BAD_REQUEST, "bad_encoding"),
            IngestError::DecompressedTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            IngestError::EventTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "event_too_large"),
            IngestError::Produce(err) => match err {
                ProduceError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "kafka_unavailable"),
                ProduceError::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                ProduceError::Timeout { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "delivery_timeout")
                }
                ProduceError::DeliveryFailed { .. } | ProduceError::Create(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "delivery_failed")
                }
            },
            IngestError::Query(err) => err.status_and_code(),
            IngestError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            IngestError::Denied(Denied::Forbidden { .. }) => (StatusCode::FORBIDDEN, "forbidden"),
            IngestError::Denied(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            IngestError::ShardBusy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            IngestError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            IngestError::CorsOriginRefused => (StatusCode::FORBIDDEN, "origin_not_allowed"),
            IngestError::MalformedRequest => (StatusCode::BAD_REQUEST, "malformed_request"),
            IngestError::ConflictingLength => (StatusCode::BAD_REQUEST, "conflicting_length"),
            IngestError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            IngestError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            IngestError::HeaderTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "header_timeout"),
            IngestError::TooManyConnections { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections")
            }
        }
    }

    /// Whether the client should retry the same request later (sent with `Retry-After`).
    pub fn is_retryable(&self) -> bool {
        self.status_and_code().0 == StatusCode::SERVICE_UNAVAILABLE
    }

    /// Headers the answer needs besides the JSON body. `Connection: close` where the
    /// request body was left unread or broken, so the connection cannot carry another
    /// request; `Accept-Encoding` on 415 for a coding, as RFC 9110 (15.5.16) asks.
    pub fn extra_headers(&self) -> &'static [(http::header::HeaderName, &'static str)] {
        use http::header::{ACCEPT_ENCODING, CONNECTION};
        match self {
            // Refused before (or while) the body is read: hyper cannot reuse the
            // connection, so say so rather than let the client find a closed socket.
            IngestError::BodyTimeout { .. }
            | IngestError::BodyRead { .. }
            | IngestError::PayloadTooLarge { .. }
            | IngestError::Denied(_)
            | IngestError::RateLimited(_) => &[(CONNECTION, "close")],
            IngestError::UnsupportedEncoding { .. } => &[(ACCEPT_ENCODING, "gzip")],
            _ => &[],
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> Vec<u8> {
        let (_, code) = self.status_and_code();
        let (details, invalid_events) = match self {
            IngestError::InvalidEvents {
                errors, invalid, ..
            } => (
                Some(&errors[..errors.len().min(MAX_LISTED_FIELD_ERRORS)]),
                Some(*invalid),
            ),
            _ => (None, None),
        };
        let param = match self {
            IngestError::Query(QueryError::BadParam { param, .. }) => Some(*param),
            _ => None,
        };
        let body = ErrorBody {
            error: code,
            message: self.to_string(),
            details,
            invalid_events,
            param,
        };
        sonic_rs::to_vec(&body).unwrap_or_else(|_| {
            format!(r#"{{"error":"{code}","message":"unprintable error"}}"#).into_bytes()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_events_lists_index_field_and_reason() {
        let err = IngestError::InvalidEvents {
            invalid: 1,
            total: 3,
            errors: vec![FieldError {
                index: 2,
                field: "match_id",
                reason: "is required".into(),
            }],
        };
        let body: sonic_rs::Value = sonic_rs::from_slice(&err.body()).expect("json");
        assert_eq!(body["error"].as_str(), Some("invalid_events"));
        assert_eq!(body["details"][0]["index"].as_u64(), Some(2));
        assert_eq!(body["details"][0]["field"].as_str(), Some("match_id"));
        assert_eq!(err.status_and_code().0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn queue_full_is_retryable_503() {
        let err = IngestError::from(ProduceError::QueueFull {
            queued: 10,
            limit: 10,
        });
        assert_eq!(
            err.status_and_code(),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        assert!(err.is_retryable());
    }

    use sonic_rs::JsonValueTrait;
}
