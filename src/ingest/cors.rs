//! CORS for browser pages that post events: the preflight answer for `OPTIONS
//! /v1/events` and the headers on every answer to `/v1/events`.
//!
//! Allowed origins come from `http.cors_allowed_origins`. Empty (the default) means no
//! CORS at all: no headers, and `OPTIONS` stays 405 as on every other path. `["*"]`
//! allows any origin; that is safe here because fanfinity never sends
//! `Access-Control-Allow-Credentials`: a page sends its key in `Authorization` or
//! `X-Fanfinity-Key`, which must be listed in the preflight answer, not as a cookie.
//! Only `/v1/events` speaks CORS; the query API is for dashboards served elsewhere.

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ALLOW, VARY,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::error::IngestError;
use super::handler::HttpResponse;
use crate::app::config::HttpConfig;

/// Request headers a page may send with an event post.
const ALLOWED_HEADERS: &str = "content-type, authorization, x-fanfinity-key, content-encoding";

/// Answer headers a page may read beyond the safelisted ones: how long to wait after a
/// 429 or 503, and why a 401 happened.
const EXPOSED_HEADERS: &str = "retry-after, www-authenticate";

/// Which origins may post events from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsPolicy {
    /// No CORS headers anywhere.
    Off,
    /// `Access-Control-Allow-Origin: *`.
    AnyOrigin { max_age: HeaderValue },
    /// The listed origins (lowercase), each echoed back when it asks.
    Origins {
        origins: Vec<String>,
        max_age: HeaderValue,
    },
}

impl CorsPolicy {
    /// The policy `http.cors_allowed_origins` describes (validated at boot by
    /// [`check_origins`]).
    pub fn from_config(http: &HttpConfig) -> Self {
        let max_age = HeaderValue::from(http.cors_max_age_secs);
        match http.cors_allowed_origins.as_slice() {
            [] => CorsPolicy::Off,
            [any] if any == "*" => CorsPolicy::AnyOrigin { max_age },
            list => CorsPolicy::Origins {
                origins: list.iter().map(|o| o.to_ascii_lowercase()).collect(),
                max_age,
            },
        }
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, CorsPolicy::Off)
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
    fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            CorsPolicy::Off => None,
            CorsPolicy::AnyOrigin { .. } => Some(HeaderValue::from_static("*")),
            CorsPolicy::Origins { origins, .. } => {
                let origin = origin?;
                let text = origin.to_str().ok()?;
                origins
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(text))
                    .then(|| origin.clone())
            }
        }
    }

    /// Answers `OPTIONS /v1/events` (only called when CORS is on): 204 with the CORS
    /// headers for an allowed origin; a plain 204 with `Allow` for an `OPTIONS` that is
    /// not a preflight (no `Origin`).
    ///
    /// # Errors
    /// [`IngestError::CorsOriginRefused`] (403) for an origin that is not allowed.
    pub fn preflight(&self, origin: Option<&HeaderValue>) -> Result<HttpResponse, IngestError> {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        if origin.is_none() {
            headers.insert(ALLOW, HeaderValue::from_static("OPTIONS, POST"));
            return Ok(response);
        }
        let allowed = self
            .allow_origin(origin)
            .ok_or(IngestError::CorsOriginRefused)?;
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOWED_HEADERS),
        );
        if let CorsPolicy::AnyOrigin { max_age } | CorsPolicy::Origins { max_age, .. } = self {
            headers.insert(ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        self.vary(headers);
        Ok(response)
    }

    /// Adds the CORS headers to an answer on `/v1/events` (errors included, so a page
    /// can read why it was refused). `Vary: Origin` goes on every such answer when the
    /// origin decides the headers, so a cache never serves one origin's answer to another.
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if let Some(allowed) = self.allow_origin(origin) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            headers.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED_HEADERS),
            );
        }
        self.vary(headers);
    }

    fn vary(&self, headers: &mut HeaderMap) {
        let named = headers
            .get_all(VARY)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"origin"));
        if matches!(self, CorsPolicy::Origins { .. }) && !named {
            headers.append(VARY, HeaderValue::from_static("origin"));
        }
    }
}

/// Checks `http.cors_allowed_origins`: `*` alone, or origins as browsers send them,
/// `http(s)://host[:port]` with no path or trailing slash. `null` is refused: sandboxed
/// frames and local files all send it, so allowing it would allow any of them.
///
/// # Errors
/// The reason, for the configuration error.
pub fn check_origins(origins: &[String]) -> Result<(), String> {
    if origins.iter().any(|o| o == "*") {
        return match origins.len() {
            1 => Ok(()),
            _ => Err("\"*\" must be the only entry".into()),
        };
    }
    for origin in origins {
        let Some((scheme, authority)) = origin.split_once("://") else {
            return Err(format!("{origin:?} is not scheme://host[:port]"));
        };
        let valid_authority = !authority.is_empty()
            && authority
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !matches!(scheme, "http" | "https") || !valid_authority {
            return Err(format!(
                "{origin:?} is not http(s)://host[:port] (no path, no trailing slash)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str]) -> CorsPolicy {
        let http = HttpConfig {
            cors_allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..HttpConfig::default()
        };
        CorsPolicy::from_config(&http)
    }

    #[test]
    fn an_allowed_origin_is_echoed_and_others_get_nothing() {
        let cors = policy(&["https://Fans.example"]);
        let fans = HeaderValue::from_static("https://fans.example");
        let evil = HeaderValue::from_static("https://evil.example");
        assert_eq!(cors.allow_origin(Some(&fans)), Some(fans.clone()));
        assert_eq!(cors.allow_origin(Some(&evil)), None);
        assert_eq!(cors.allow_origin(None), None);
        let mut headers = HeaderMap::new();
        cors.decorate(Some(&evil), &mut headers);
        assert!(headers.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert_eq!(
            headers.get(VARY).map(|v| v.as_bytes()),
            Some(&b"origin"[..])
        );
    }

    #[test]
    fn a_preflight_from_a_refused_origin_is_403() {
        let cors = policy(&["https://fans.example"]);
        let evil = HeaderValue::from_static("https://evil.example");
        let refused = cors.preflight(Some(&evil)).map(|_| ());
        assert!(matches!(refused, Err(IngestError::CorsOriginRefused)));
        let fans = HeaderValue::from_static("https://fans.example");
        let ok = cors.preflight(Some(&fans)).expect("allowed");
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(ok.headers()[ACCESS_CONTROL_ALLOW_METHODS], "POST");
        assert_eq!(ok.headers()[ACCESS_CONTROL_MAX_AGE], "600");
    }

    #[test]
    fn any_origin_answers_star_and_empty_is_off() {
        let origin = HeaderValue::from_static("https://x.example");
        assert_eq!(
            policy(&["*"]).allow_origin(Some(&origin)),
            Some(HeaderValue::from_static("*"))
        );
        assert!(!policy(&[]).is_on());
    }

    #[test]
    fn origins_must_look_like_what_browsers_send() {
        let ok =
            |list: &[&str]| check_origins(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["https://fans.example", "http://localhost:3000"]).is_ok());
        assert!(ok(&["*"]).is_ok());
        for bad in [
            &["*", "https://a.example"][..],
            &["https://a.example/"],
            &["https://a.example/path"],
            &["null"],
            &["ftp://a.example"],
            &["fans.example"],
        ] {
            assert!(ok(bad).is_err(), "{bad:?} accepted");
        }
    }
}
