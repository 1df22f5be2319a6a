//! `fanfinity noop-server`, the HTTP layer's ceiling in benches/compare: it answers every
//! event post 202 after reading the body, without decoding it and without Kafka, on the
//! same shards and connection handling as the real server. No stack needed: the broker
//! address points at a closed port, so any use of Kafka would show up as a 503.

mod common;
use common::*;

/// A port nothing listens on: nothing in the no-op server may reach for a broker.
const NO_BROKER: &str = "127.0.0.1:1";

#[test]
fn noop_server_answers_202_to_any_post_without_kafka() {
    let names = Names::new("noop_post");
    let server = Server::start("noop-server", &names, NO_BROKER, &[]);

    let valid = serde_json::to_vec(&event(&new_id(), "m1", "u1", "cheer")).expect("encode");
    let not_even_json = b"this is not decoded".to_vec();
    for body in [valid, not_even_json] {
        let resp = server.post("application/json", &body);
        assert_eq!(resp.status, 202, "{}", resp.text());
        assert_eq!(
            resp.json(),
            serde_json::json!({"accepted": 0, "noop": true})
        );
    }
}

#[test]
fn noop_server_is_ready_and_routes_like_the_real_one() {
    let names = Names::new("noop_routes");
    let server = Server::start("noop-server", &names, NO_BROKER, &[]);

    let ready = server.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["kafka"], serde_json::Value::Null);
    assert_eq!(server.get("/healthz").status, 200);
    let wrong_method = server.get("/v1/events");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("POST"));
}
