//! Everything a request can fail with, and the one place each failure becomes an HTTP
//! status and a JSON body `{"error": code, "message": ..., ...}`.

use http::StatusCode;
use serde::Serialize;

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
         use application/json or application/x-ndjson"
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
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_events: Option<usize>,
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
        }
    }

    /// Whether the client should retry the same request later (sent with `Retry-After`).
    pub fn is_retryable(&self) -> bool {
        self.status_and_code().0 == StatusCode::SERVICE_UNAVAILABLE
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
        let body = ErrorBody {
            error: code,
            message: self.to_string(),
            details,
            invalid_events,
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
