//! Rate limits and CORS against the real server over raw HTTP/1.1: a key over its event
//! rate, an address over its request rate, buckets refilling, many distinct clients, and
//! browser preflights and answers. Real services only (`make stack-up`).
//!
//! Each shard keeps its own buckets, so the limit tests run a single shard. A request
//! refused before its body is read closes its connection (hyper cannot reuse it), so
//! every request opens its own.

#![cfg(feature = "stack-tests")]

mod common;

use std::time::Duration;

use common::*;
use fanfinity::auth::dev;
use fanfinity::auth::keys::new_key;
use fanfinity::auth::Role;
use serde_json::json;

/// Posts `count` events of `match_id` with `headers`.
fn post_events(
    server: &Server,
    count: usize,
    match_id: &str,
    headers: &[(&str, &str)],
) -> Response {
    let events: Vec<_> = (0..count)
        .map(|i| event(&new_id(), match_id, &format!("fan-{i}"), "cheer"))
        .collect();
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let body = json!(events).to_string();
    request(&server.addr(), "POST", "/v1/events", &all, body.as_bytes())
}

/// An event post with an empty body: past the address limit it is refused at once with
/// 400, without waiting for Kafka, so a burst is spent faster than it refills.
fn post_nothing(server: &Server, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(&server.addr(), "POST", "/v1/events", &all, b"")
}

/// Checks a 429 `rate_limited` and returns its `Retry-After`: whole seconds, at least 1.
fn assert_rate_limited(resp: &Response) -> u64 {
    assert_eq!(resp.status, 429, "{}", resp.text());
    assert_eq!(resp.json()["error"], "rate_limited");
    let secs: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", resp.headers));
    assert!(secs >= 1, "Retry-After is at least 1");
    secs
}

#[test]
fn a_key_over_its_event_rate_gets_429_while_another_key_is_unaffected() {
    let names = Names::new("keylimit");
    let second = new_key("second app", vec![Role::Ingest]).expect("key");
    let keys = keys_setting(&[dev::ingest_key().entry, second.entry.clone()]);
    let server = Server::start(
        "serve",
        &names,
        &brokers(),
        &[
            "auth.enabled=true",
            &keys,
            "http.shards=1",
            "http.max_events_per_request=20",
            "limits.per_key_events_per_sec=1",
            "limits.per_key_burst=20",
        ],
    );
    let first = format!("Bearer {}", dev::ingest_key().key);
    let second = format!("Bearer {}", second.key);
    let m = "keylimit-m1";

    // The burst is counted in events: one 20-event request empties it.
    let full = post_events(&server, 20, m, &[("Authorization", &first)]);
    assert_eq!(full.status, 202, "{}", full.text());
    let over = post_events(&server, 1, m, &[("Authorization", &first)]);
    let wait = assert_rate_limited(&over);
    assert!(
        wait <= 1,
        "one event at 1/s is at most 1 s away, not {wait}"
    );

    let other = post_events(&server, 20, m, &[("Authorization", &second)]);
    assert_eq!(
        other.status,
        202,
        "another key, its own bucket: {}",
        other.text()
    );

    // Four seconds later about 4 tokens are back: enough for 2 events, not for 20; the
    // wait named for 20 is for the 19 still missing after the first one's token.
    std::thread::sleep(Duration::from_secs(4));
    let too_big = post_events(&server, 20, m, &[("Authorization", &first)]);
    let wait = assert_rate_limited(&too_big);
    assert!(wait >= 10, "20 events at 1/s with about 4 tokens: {wait} s");
    let small = post_events(&server, 2, m, &[("Authorization", &first)]);
    assert_eq!(small.status, 202, "the bucket refilled: {}", small.text());

    drop(server);
    drop_database(&names);
}

#[test]
fn an_address_over_its_request_rate_gets_429_then_refills() {
    let names = Names::new("iplimit");
    let server = Server::start(
        "serve",
        &names,
        &brokers(),
        &[
            "http.shards=1",
            "limits.per_ip_requests_per_sec=1",
            "limits.per_ip_burst=3",
        ],
    );
    let m = "iplimit-m1";
    for i in 0..3 {
        let resp = post_nothing(&server, &[]);
        assert_eq!(
            resp.status,
            400,
            "request {i} is within the burst: {}",
            resp.text()
        );
    }
    let over = post_events(&server, 1, m, &[]);
    let wait = assert_rate_limited(&over);
    assert!(
        wait <= 1,
        "one request at 1/s is at most 1 s away, not {wait}"
    );

    // Without limits.trust_forwarded_for a client cannot name another address.
    let spoofed = post_events(&server, 1, m, &[("X-Forwarded-For", "203.0.113.7")]);
    assert_rate_limited(&spoofed);
    // Health checks are not API requests and stay open to probes.
    assert_eq!(server.get("/healthz").status, 200);
    // No CORS configured: OPTIONS stays 405 here too.
    let addr = server.addr();
    let options = request(
        &addr,
        "OPTIONS",
        "/v1/events",
        &[("Origin", "https://a.example")],
        b"",
    );
    assert_eq!(options.status, 405, "{}", options.text());

    std::thread::sleep(Duration::from_secs(wait));
    let again = post_events(&server, 1, m, &[]);
    assert_eq!(again.status, 202, "the bucket refilled: {}", again.text());

    drop(server);
    drop_database(&names);
}

#[test]
fn forwarded_addresses_are_counted_apart_only_when_trusted_and_many_stay_bounded() {
    let names = Names::new("xfflimit");
    let server = Server::start(
        "serve",
        &names,
        &brokers(),
        &[
            "http.shards=1",
            "limits.trust_forwarded_for=true",
            "limits.per_ip_requests_per_sec=1",
            "limits.per_ip_burst=1",
            "limits.max_buckets_per_shard=16",
            "http.cors_allowed_origins=[\"https://fans.example\"]",
        ],
    );
    let m = "xff-m1";
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    assert_eq!(post_nothing(&server, &from("198.51.100.1")).status, 400);
    // A page can see why it was refused and for how long: a 429 carries CORS headers.
    let limited = post_events(
        &server,
        1,
        m,
        &[
            ("X-Forwarded-For", "198.51.100.1"),
            ("Origin", "https://fans.example"),
        ],
    );
    assert_rate_limited(&limited);
    assert_eq!(
        limited.header("access-control-allow-origin"),
        Some("https://fans.example")
    );
    let exposed = limited.header("access-control-expose-headers");
    assert!(
        exposed.is_some_and(|h| h.contains("retry-after")),
        "{exposed:?}"
    );
    assert_eq!(
        post_events(&server, 1, m, &from("198.51.100.2")).status,
        202
    );

    // 300 distinct clients on a shard capped at 16 buckets: each new one is served (the
    // 400 for its empty body comes after the limit), none gets 429, the shard still
    // answers, and forgetting buckets still in use is logged.
    for i in 0..300u32 {
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let resp = post_nothing(&server, &[("X-Forwarded-For", &ip)]);
        assert_eq!(resp.status, 400, "client {ip}: {}", resp.text());
    }
    assert_eq!(server.get("/readyz").status, 200);
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("rate-limit buckets at their cap"),
        "eviction logged"
    );

    drop(server);
    drop_database(&names);
}

#[test]
fn cors_answers_preflights_and_marks_answers_for_allowed_origins() {
    let names = Names::new("cors");
    let server = Server::start(
        "serve",
        &names,
        &brokers(),
        &["http.cors_allowed_origins=[\"https://fans.example\"]"],
    );
    let addr = server.addr();
    let fans = "https://fans.example";

    let preflight = request(
        &addr,
        "OPTIONS",
        "/v1/events",
        &[
            ("Origin", fans),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, authorization",
            ),
        ],
        b"",
    );
    assert_eq!(preflight.status, 204, "{}", preflight.text());
    assert_eq!(preflight.header("access-control-allow-origin"), Some(fans));
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST")
    );
    let allowed = preflight
        .header("access-control-allow-headers")
        .expect("allowed headers");
    for name in [
        "content-type",
        "authorization",
        "x-fanfinity-key",
        "content-encoding",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert_eq!(preflight.header("access-control-max-age"), Some("600"));
    assert_eq!(preflight.header("vary"), Some("origin"));

    let refused = request(
        &addr,
        "OPTIONS",
        "/v1/events",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.json()["error"], "origin_not_allowed");
    assert_eq!(refused.header("access-control-allow-origin"), None);

    let post = |origin: &str, body: String| {
        request(
            &addr,
            "POST",
            "/v1/events",
            &[("Content-Type", "application/json"), ("Origin", origin)],
            body.as_bytes(),
        )
    };
    let accepted = post(
        fans,
        json!([event(&new_id(), "cors-m1", "fan", "cheer")]).to_string(),
    );
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert_eq!(accepted.header("access-control-allow-origin"), Some(fans));
    assert_eq!(accepted.header("vary"), Some("origin"));
    let exposed = accepted
        .header("access-control-expose-headers")
        .expect("exposed headers");
    assert!(exposed.contains("retry-after"), "{exposed}");

    let invalid = post(
        fans,
        json!([{"user_id": "fan", "type": "cheer"}]).to_string(),
    );
    assert_eq!(invalid.status, 400, "{}", invalid.text());
    assert_eq!(invalid.json()["error"], "invalid_events");
    assert_eq!(invalid.header("access-control-allow-origin"), Some(fans));
    assert_eq!(invalid.header("vary"), Some("origin"));

    // The server does not refuse a simple post from elsewhere (the browser withholds
    // the answer from the page), but it never names that origin.
    let elsewhere = post(
        "https://evil.example",
        json!([event(&new_id(), "cors-m1", "fan", "cheer")]).to_string(),
    );
    assert_eq!(elsewhere.status, 202);
    assert_eq!(elsewhere.header("access-control-allow-origin"), None);

    let other_path = request(&addr, "OPTIONS", "/healthz", &[("Origin", fans)], b"");
    assert_eq!(other_path.status, 405, "{}", other_path.text());
    assert_eq!(other_path.header("access-control-allow-origin"), None);
    let wrong_method = request(&addr, "PUT", "/v1/events", &[("Origin", fans)], b"");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("OPTIONS, POST"));
    assert_eq!(
        wrong_method.header("access-control-allow-origin"),
        Some(fans)
    );

    drop(server);
    drop_database(&names);
}
