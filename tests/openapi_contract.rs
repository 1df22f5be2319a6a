//! `docs/openapi.yaml` against the real server: the file documents exactly the routes the
//! server serves, and every answer a real `fanfinity serve` gives (successes and errors,
//! with auth and CORS on) matches the schema the file documents for that operation and
//! status, including its media type and required headers.
//!
//! The validator lives in `common/schema.rs`; the first tests here prove it rejects
//! drift (a missing field, an extra one, a float where an integer is promised, ...), so
//! a passing contract test means something.

#![cfg(feature = "stack-tests")]

mod common;
#[path = "common/schema.rs"]
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use fanfinity::auth::dev;
use fanfinity::event::EventType;
use schema::Spec;
use serde_json::{json, Value};

const LAND: Duration = Duration::from_secs(90);
const ALLOWED_ORIGIN: &str = "https://fans.example";
/// Every query parameter any analytics endpoint takes.
const QUERY_PARAMS: [&str; 4] = ["from", "to", "bucket", "limit"];

fn spec() -> Spec {
    Spec::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml"))
}

/// Every (path, method) the server routes, as the OpenAPI file must spell them.
fn served() -> BTreeSet<(String, String)> {
    let mut out: BTreeSet<(String, String)> = fanfinity::query::api::PATHS
        .iter()
        .map(|p| (p.to_string(), "GET".to_string()))
        .collect();
    for (path, method) in [
        ("/v1/events", "POST"),
        // Only with `http.cors_allowed_origins` set; 405 otherwise.
        ("/v1/events", "OPTIONS"),
        ("/", "GET"),
        ("/matches/{match_id}", "GET"),
        ("/healthz", "GET"),
        ("/readyz", "GET"),
        ("/metrics", "GET"),
    ] {
        out.insert((path.to_string(), method.to_string()));
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn errors_text(errors: &[String]) -> String {
    errors.join("\n  ")
}

// ---------------------------------------------------------------------------------------
// The validator catches drift.

/// A change to a correct answer that the validator must notice.
type Mutation = Box<dyn Fn(&mut Value)>;

/// A metrics answer as the server writes it.
fn sample_metrics() -> Value {
    let by_type = json!({"reaction":1,"cheer":2,"goal_celebration":0,"poll_vote":0,
                         "chat":0,"share":0,"view":0});
    json!({
        "match_id": "m1", "window": {"from_ms": 0, "to_ms": 60000}, "bucket_seconds": 60,
        "total_events": 3, "unique_fans": 2, "by_type": by_type,
        "by_team": {"ARG": 2, "": 1},
        "timeline": [{"t": 0, "events": 3, "unique_fans": 2, "by_type": by_type}],
        "timeline_truncated": false, "newest_received_at_ms": 1, "generated_at_ms": 2
    })
}

#[test]
fn validator_rejects_drift_from_the_real_schemas() {
    let spec = spec();
    let good = sample_metrics();
    spec.validate_named("MatchMetrics", &good)
        .unwrap_or_else(|e| panic!("a correct answer was refused:\n  {}", errors_text(&e)));
    let mut nullable = good.clone();
    nullable["newest_received_at_ms"] = Value::Null;
    assert!(spec.validate_named("MatchMetrics", &nullable).is_ok());

    let cases: Vec<(&str, Mutation)> = vec![
        (
            "missing required property `view`",
            Box::new(|v: &mut Value| {
                v["by_type"].as_object_mut().map(|m| m.remove("view"));
            }),
        ),
        (
            "property `surprise` is not documented",
            Box::new(|v: &mut Value| v["timeline"][0]["by_type"]["surprise"] = json!(1)),
        ),
        (
            "property `timeline_from_ms` is not documented",
            Box::new(|v: &mut Value| v["timeline_from_ms"] = json!(0)),
        ),
        (
            "missing required property `timeline_truncated`",
            Box::new(|v: &mut Value| {
                v.as_object_mut().map(|m| m.remove("timeline_truncated"));
            }),
        ),
        (
            "$.unique_fans: expected integer",
            Box::new(|v: &mut Value| v["unique_fans"] = json!(1.5)),
        ),
        (
            "$.total_events: expected integer",
            Box::new(|v: &mut Value| v["total_events"] = json!(3.0)),
        ),
        (
            "not nullable",
            Box::new(|v: &mut Value| v["generated_at_ms"] = Value::Null),
        ),
        (
            "$.by_team.ARG: expected integer",
            Box::new(|v: &mut Value| v["by_team"]["ARG"] = json!("2")),
        ),
        (
            "$.timeline[0].events: 0 is below the minimum 1",
            Box::new(|v: &mut Value| v["timeline"][0]["events"] = json!(0)),
        ),
        (
            "$.window: expected object",
            Box::new(|v: &mut Value| v["window"] = json!([0, 60000])),
        ),
    ];
    for (expected, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        let errors = spec
            .validate_named("MatchMetrics", &bad)
            .expect_err(expected);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "wanted an error containing {expected:?}, got:\n  {}",
            errors_text(&errors)
        );
    }

    let error = json!({"error": "unknown_match", "message": "no events"});
    assert!(spec.validate_named("Error", &error).is_ok());
    let invented = json!({"error": "teapot", "message": "x"});
    assert!(spec.validate_named("Error", &invented).is_err());
    let extra = json!({"error": "not_found", "message": "x", "field": "bucket"});
    assert!(spec.validate_named("Error", &extra).is_err());
    let moment = json!({"t": 0, "events": 5, "baseline": 1, "score": 5.0,
                        "dominant_type": "kickoff", "dominant_share": 1.0,
                        "by_type": good["by_type"]});
    let errors = spec
        .validate_named("Moment", &moment)
        .expect_err("bad type");
    assert!(
        errors.iter().any(|e| e.contains("dominant_type")),
        "{errors:?}"
    );
}

#[test]
fn validator_handles_each_supported_keyword() {
    let spec = Spec::parse(
        r##"
components:
  schemas:
    Thing:
      type: object
      additionalProperties: false
      required: [id, tags]
      properties:
        id: {type: integer, minimum: 1, maximum: 9}
        ratio: {type: number}
        kind: {type: string, enum: [a, b], nullable: true}
        tags: {type: array, maxItems: 2, items: {type: string, minLength: 1}}
        counts: {type: object, additionalProperties: {type: integer}}
        child: {$ref: '#/components/schemas/Child'}
    Child:
      type: object
      additionalProperties: false
      properties:
        ok: {type: boolean}
    Sloppy:
      type: string
      pattern: '^x$'
    Lost:
      type: object
      properties:
        child: {$ref: '#/components/schemas/Child', nullable: true}
"##,
    );
    let good = json!({"id": 3, "ratio": 2, "kind": null, "tags": ["x"],
                      "counts": {"a": 1}, "child": {"ok": true}});
    assert_eq!(spec.validate_named("Thing", &good), Ok(()));
    for bad in [
        json!({"id": 0, "tags": []}),
        json!({"id": 10, "tags": []}),
        json!({"id": 1.0, "tags": []}),
        json!({"id": 1}),
        json!({"id": 1, "tags": [], "other": 1}),
        json!({"id": 1, "tags": ["a", "b", "c"]}),
        json!({"id": 1, "tags": [""]}),
        json!({"id": 1, "tags": [1]}),
        json!({"id": 1, "tags": [], "kind": "c"}),
        json!({"id": 1, "tags": [], "ratio": "1"}),
        json!({"id": 1, "tags": [], "counts": {"a": 1.5}}),
        json!({"id": 1, "tags": [], "child": {"ok": 1}}),
        json!({"id": 1, "tags": [], "child": {"ok": true, "extra": 1}}),
        json!({"id": 1, "tags": [], "child": null}),
        json!([1]),
    ] {
        assert!(
            spec.validate_named("Thing", &bad).is_err(),
            "accepted {bad}"
        );
    }
    // Keywords the validator does not check are reported, never skipped.
    let errors = spec
        .validate_named("Sloppy", &json!("x"))
        .expect_err("pattern");
    assert!(
        errors[0].contains("unsupported schema keyword `pattern`"),
        "{errors:?}"
    );
    let errors = spec
        .validate_named("Lost", &json!({"child": null}))
        .expect_err("nullable beside $ref");
    assert!(
        errors.iter().any(|e| e.contains("beside $ref")),
        "{errors:?}"
    );
    let errors = spec
        .validate_named("Nothing", &json!(1))
        .expect_err("dangling");
    assert!(errors[0].contains("points at nothing"), "{errors:?}");
}

// ---------------------------------------------------------------------------------------
// Static checks of the file against the code.

#[test]
fn the_file_documents_exactly_the_served_routes() {
    let documented = spec().operations();
    let served = served();
    assert_eq!(
        documented,
        served,
        "documented but not served: {:?}; served but not documented: {:?}",
        documented.difference(&served).collect::<Vec<_>>(),
        served.difference(&documented).collect::<Vec<_>>()
    );
}

#[test]
fn by_type_maps_and_the_type_enum_list_exactly_the_seven_types() {
    let spec = spec();
    let strings = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    };
    let types: BTreeSet<String> = EventType::ALL
        .iter()
        .map(|t| t.as_str().to_string())
        .collect();
    let by_type = &spec.root["components"]["schemas"]["ByType"];
    let props: BTreeSet<String> = by_type["properties"]
        .as_object()
        .expect("ByType.properties")
        .keys()
        .cloned()
        .collect();
    assert_eq!(strings(&by_type["required"]), types);
    assert_eq!(props, types);
    assert_eq!(by_type["additionalProperties"], json!(false));
    assert_eq!(
        strings(&spec.root["components"]["schemas"]["EventType"]["enum"]),
        types
    );
}

#[test]
fn every_answer_schema_is_closed_and_every_operation_documents_its_errors() {
    let spec = spec();
    for (path, method) in spec.operations() {
        let op = spec.operation(&path, &method).expect("operation");
        for (status, response) in op["responses"].as_object().expect("responses") {
            let response = spec.deref(response).expect("response $ref");
            for (media, content) in response["content"].as_object().into_iter().flatten() {
                let open = spec.open_objects(&content["schema"], "$");
                assert!(
                    open.is_empty(),
                    "{method} {path} {status} {media}: object schemas without \
                     additionalProperties: {open:?}"
                );
            }
        }
        let documented: BTreeSet<&str> = op["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .map(String::as_str)
            .collect();
        let mut needed = vec!["405"];
        if path.starts_with("/v1/") && method != "OPTIONS" {
            needed.extend(["400", "401", "403", "429", "503"]);
        }
        if path.starts_with("/v1/matches/") {
            needed.push("404");
        }
        for status in needed {
            assert!(
                documented.contains(status),
                "{method} {path} does not document {status}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server against the file.

/// A running server with auth (the development keys) and CORS on.
struct Stack {
    spec: Spec,
    server: Server,
    names: Names,
    ingest: String,
    read: String,
}

impl Stack {
    fn start() -> Self {
        // Names private to this test, prefixed `oapi_`.
        let mut names = Names::new("oapi");
        names.prefix = names.prefix.replacen("t.", "", 1);
        names.database = names.database.replacen("t_", "", 1);
        assert!(names.prefix.starts_with("oapi_") && names.database.starts_with("oapi_"));
        let keys = keys_setting(&[dev::ingest_key().entry, dev::read_key().entry]);
        let cors = format!("http.cors_allowed_origins=[\"{ALLOWED_ORIGIN}\"]");
        let server = Server::start(
            "serve",
            &names,
            &brokers(),
            &["auth.enabled=true", &keys, &cors],
        );
        Self {
            spec: spec(),
            server,
            names,
            ingest: dev::ingest_key().key,
            read: dev::read_key().key,
        }
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(&self.server.addr(), method, path, headers, body)
    }

    /// A GET with the read key, alternating the two documented ways to send it.
    fn read_get(&self, path: &str, bearer: bool) -> Response {
        let bearer_value = format!("Bearer {}", self.read);
        let header = if bearer {
            ("Authorization", bearer_value.as_str())
        } else {
            ("X-Fanfinity-Key", self.read.as_str())
        };
        self.send("GET", path, &[header], b"")
    }

    fn post_events(&self, content_type: &str, extra: &[(&str, &str)], body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.ingest);
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", content_type),
        ];
        headers.extend_from_slice(extra);
        self.send("POST", "/v1/events", &headers, body)
    }

    /// Checks an answer against what the file documents for `template` (the documented
    /// path), `method` and the answer's status: the status is documented, the media
    /// type is one the answer lists, required headers are present, and the body matches
    /// the schema. Returns the body (JSON, or a JSON string for text).
    fn check(&self, template: &str, method: &str, resp: &Response) -> Value {
        let what = format!("{method} {template} -> {}", resp.status);
        let response = self
            .spec
            .response(template, method, resp.status)
            .unwrap_or_else(|err| panic!("{what}: {err}; body: {}", resp.text()));
        for (name, header) in response["headers"].as_object().into_iter().flatten() {
            let header = self.spec.deref(header).expect("header $ref");
            if header["required"] == json!(true) {
                assert!(
                    resp.header(name).is_some(),
                    "{what}: documented header {name} is missing"
                );
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            assert!(
                resp.body.is_empty(),
                "{what}: documented without a body, got {}",
                resp.text()
            );
            return Value::Null;
        };
        let content_type = resp
            .header("content-type")
            .unwrap_or_else(|| panic!("{what}: no Content-Type"));
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let documented = content.get(&media).unwrap_or_else(|| {
            panic!(
                "{what}: answered {content_type}, documented {:?}",
                content.keys().collect::<Vec<_>>()
            )
        });
        let body = if media.ends_with("json") {
            resp.json()
        } else {
            Value::String(resp.text())
        };
        if let Err(errors) = self.spec.validate(&documented["schema"], &body) {
            panic!(
                "{what}: the answer does not match the documented schema:\n  {}\nbody: {}",
                errors_text(&errors),
                resp.text()
            );
        }
        body
    }

    /// As [`Stack::check`] for an error answer, which must carry `code`.
    fn check_error(&self, template: &str, method: &str, resp: &Response, status: u16, code: &str) {
        assert_eq!(resp.status, status, "{method} {template}: {}", resp.text());
        let body = self.check(template, method, resp);
        assert_eq!(body["error"], code, "{method} {template}: {body}");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.server.terminate(Duration::from_secs(15));
        drop_database(&self.names);
    }
}

/// The test's events: a quiet start, a goal spike at minute 20, reactions with emoji,
/// two polls, and two events at the current time (no `ts`).
fn match_events(m: &str, kickoff_ms: i64) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let at = |minute: i64, second: i64| json!(kickoff_ms + minute * 60_000 + second * 1000);
    let mut history = Vec::new();
    for minute in 0..10 {
        let mut e = event(&new_id(), m, "u1", "cheer");
        e["ts"] = at(minute, 5);
        e["team"] = json!("ARG");
        history.push(e);
    }
    for (i, user) in ["u1", "u2", "u3", "u4", "u5", "u6"].iter().enumerate() {
        let mut e = event(&new_id(), m, user, "goal_celebration");
        e["ts"] = at(20, i as i64);
        e["team"] = json!("FRA");
        history.push(e);
    }
    for (user, emoji) in [
        ("u2", Some("🔥")),
        ("u3", Some("🔥")),
        ("u4", Some("🔥")),
        ("u5", Some("⚽")),
        ("u6", Some("⚽")),
        ("u1", None),
    ] {
        let mut e = event(&new_id(), m, user, "reaction");
        e["ts"] = at(21, 0);
        if let Some(emoji) = emoji {
            e["payload"] = json!({"emoji": emoji});
        }
        history.push(e);
    }
    let mut votes = Vec::new();
    for (user, poll, option) in [
        ("u1", "motm", "messi"),
        ("u2", "motm", "messi"),
        ("u3", "motm", "mbappe"),
        ("u4", "next-goal", "ARG"),
    ] {
        let mut e = event(&new_id(), m, user, "poll_vote");
        e["ts"] = at(22, 0);
        e["payload"] = json!({"poll_id": poll, "option": option});
        votes.push(e);
    }
    let now = vec![
        event(&new_id(), m, "u7", "view"),
        event(&new_id(), m, "u8", "view"),
    ];
    (history, votes, now)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn fill(template: &str, match_id: &str) -> String {
    template.replace("{match_id}", match_id)
}

#[test]
fn the_server_answers_what_the_file_documents() {
    let stack = Stack::start();
    let m = format!("oapi-{}", &new_id()[..8]);

    // (a) Every documented route is routed (no 404 `not_found`), and its answer, whatever
    // it is before any event exists, is documented.
    for (path, method) in stack.spec.operations() {
        let url = fill(&path, &m);
        let resp = match (path.as_str(), method.as_str()) {
            ("/v1/events", "POST") => stack.post_events("application/json", &[], b"[]"),
            ("/v1/events", "OPTIONS") => stack.send("OPTIONS", &url, &[], b""),
            (p, "GET") if p.starts_with("/v1/") => stack.read_get(&url, true),
            (_, method) => stack.send(method, &url, &[], b""),
        };
        let body = stack.check(&path, &method, &resp);
        assert!(
            !(resp.status == 404 && body["error"] == "not_found"),
            "{method} {path} is documented but not routed"
        );
        if path.starts_with("/v1/matches/") {
            assert_eq!(body["error"], "unknown_match", "{method} {path}");
        }
    }
    for undocumented in [
        "/v1/matches/x/nope",
        "/v1/nope",
        "/matches/a/b",
        "/v1/matches/x",
    ] {
        let resp = stack.read_get(undocumented, false);
        assert_eq!(resp.status, 404, "{undocumented}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["error"], "not_found", "{undocumented}");
        if let Err(errors) = stack.spec.validate_named("Error", &body) {
            panic!("{undocumented}: {}", errors_text(&errors));
        }
    }

    // (b) Post events in each documented body format, wait for them, then call every
    // documented GET with and without its documented parameters.
    let kickoff_ms = (now_ms() - 30 * 60_000) / 60_000 * 60_000;
    let (history, votes, now) = match_events(&m, kickoff_ms);
    let resp = stack.post_events(
        "application/json",
        &[],
        json!(history).to_string().as_bytes(),
    );
    assert_eq!(resp.status, 202, "{}", resp.text());
    let accepted = stack.check("/v1/events", "POST", &resp);
    assert_eq!(accepted["accepted"], history.len());
    let ndjson: String = votes.iter().map(|v| format!("{v}\n")).collect();
    let key_header = [("X-Fanfinity-Key", stack.ingest.as_str())];
    let resp = stack.send(
        "POST",
        "/v1/events",
        &[key_header[0], ("Content-Type", "application/x-ndjson")],
        ndjson.as_bytes(),
    );
    assert_eq!(resp.status, 202, "{}", resp.text());
    stack.check("/v1/events", "POST", &resp);
    let resp = stack.post_events(
        "application/json",
        &[("Content-Encoding", "gzip")],
        &gzip(json!(now).to_string().as_bytes()),
    );
    assert_eq!(resp.status, 202, "{}", resp.text());
    stack.check("/v1/events", "POST", &resp);

    let all: Vec<&Value> = history.iter().chain(&votes).chain(&now).collect();
    let total = all.len() as u64;
    let metrics_path = format!("/v1/matches/{m}/metrics");
    eventually(LAND, "the events in /metrics", || {
        let resp = stack.read_get(&metrics_path, true);
        (resp.status == 200 && resp.json()["total_events"] == total).then_some(())
    });

    let from = time::OffsetDateTime::from_unix_timestamp(kickoff_ms / 1000)
        .expect("kickoff")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let to = (now_ms() + 120_000).to_string();
    let mut answers: BTreeMap<(String, bool), Value> = BTreeMap::new();
    let mut bearer = false;
    for (path, method) in stack.spec.operations() {
        if method != "GET" {
            continue;
        }
        let url = fill(&path, &m);
        let query: Vec<String> = stack
            .spec
            .parameters(&path, &method)
            .into_iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                let name = p["name"].as_str().expect("parameter name");
                let value = match name {
                    "from" => from.clone(),
                    "to" => to.clone(),
                    _ => match &p["example"] {
                        Value::String(s) => s.clone(),
                        Value::Null => panic!("{path}: parameter {name} has no example"),
                        other => other.to_string(),
                    },
                };
                format!("{name}={value}")
            })
            .collect();
        let mut urls = vec![(url.clone(), false)];
        if !query.is_empty() {
            urls.push((format!("{url}?{}", query.join("&")), true));
        }
        for (url, with_params) in urls {
            bearer = !bearer;
            let resp = if path.starts_with("/v1/") {
                stack.read_get(&url, bearer)
            } else {
                stack.send("GET", &url, &[], b"")
            };
            assert_eq!(resp.status, 200, "GET {url}: {}", resp.text());
            let body = stack.check(&path, "GET", &resp);
            answers.insert((path.clone(), with_params), body);
        }
    }

    // The numbers the schemas cannot check: the events posted, counted.
    let count = |pred: &dyn Fn(&Value) -> bool| all.iter().filter(|e| pred(e)).count() as u64;
    let get = |path: &str, params: bool| answers[&(path.to_string(), params)].clone();
    for params in [false, true] {
        let metrics = get("/v1/matches/{match_id}/metrics", params);
        assert_eq!(metrics["total_events"], total, "{metrics}");
        for t in EventType::ALL {
            let name = t.as_str();
            assert_eq!(
                metrics["by_type"][name],
                count(&|e| e["type"] == name),
                "{name}: {metrics}"
            );
        }
        assert_eq!(metrics["by_team"]["ARG"], count(&|e| e["team"] == "ARG"));
        assert_eq!(metrics["by_team"]["FRA"], count(&|e| e["team"] == "FRA"));
        assert_eq!(metrics["by_team"][""], count(&|e| e.get("team").is_none()));
        let users: BTreeSet<String> = all.iter().map(|e| e["user_id"].to_string()).collect();
        assert_eq!(metrics["unique_fans"], users.len() as u64);
        let reactions = get("/v1/matches/{match_id}/reactions", params);
        assert_eq!(reactions["total_reactions"], 5, "{reactions}");
        assert_eq!(
            reactions["reactions"],
            json!([{"emoji": "🔥", "count": 3}, {"emoji": "⚽", "count": 2}])
        );
        let polls = get("/v1/matches/{match_id}/polls", params);
        assert_eq!(polls["polls"][0]["poll_id"], "motm", "{polls}");
        assert_eq!(polls["polls"][0]["total_votes"], 3);
        assert_eq!(
            polls["polls"][0]["options"][0],
            json!({"option": "messi", "votes": 2, "share": 0.667})
        );
        assert_eq!(polls["polls"][1]["total_votes"], 1);
        let fans = get("/v1/matches/{match_id}/fans", params);
        assert_eq!(fans["fans"][0]["user_id"], "u1", "{fans}");
        assert_eq!(fans["fans"][0]["events"], count(&|e| e["user_id"] == "u1"));
        let list = get("/v1/matches", params);
        let listed = list["matches"]
            .as_array()
            .expect("matches")
            .iter()
            .find(|s| s["match_id"] == m.as_str())
            .unwrap_or_else(|| panic!("{m} not listed: {list}"));
        assert_eq!(listed["events"], total);
    }
    // Defaults the file promises.
    assert_eq!(
        get("/v1/matches/{match_id}/metrics", false)["bucket_seconds"],
        60
    );
    assert_eq!(
        get("/v1/matches/{match_id}/moments", false)["bucket_seconds"],
        60
    );
    let moments = get("/v1/matches/{match_id}/moments", true);
    assert_eq!(
        moments["moments"][0]["t"],
        kickoff_ms + 20 * 60_000,
        "{moments}"
    );
    assert_eq!(moments["moments"][0]["dominant_type"], "goal_celebration");
    let live = get("/v1/matches/{match_id}/live", false);
    assert!(live["by_type"]["view"].as_u64() >= Some(1), "{live}");
    assert_eq!(
        get("/v1/matches/{match_id}/metrics", true)["window"]["from_ms"],
        kickoff_ms
    );

    // Each documented query parameter is taken, each undocumented one refused; the
    // documented range of `limit` is the server's.
    for path in fanfinity::query::api::PATHS {
        let url = fill(path, &m);
        let documented: BTreeSet<String> = stack
            .spec
            .parameters(path, "GET")
            .into_iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().expect("name").to_string())
            .collect();
        for name in QUERY_PARAMS {
            if documented.contains(name) {
                continue;
            }
            let resp = stack.read_get(&format!("{url}?{name}=1"), false);
            stack.check_error(path, "GET", &resp, 400, "invalid_parameter");
        }
        let limit = stack
            .spec
            .parameters(path, "GET")
            .into_iter()
            .find(|p| p["name"] == "limit");
        if let Some(limit) = limit {
            let (min, max) = (
                limit["schema"]["minimum"].as_i64().expect("limit minimum"),
                limit["schema"]["maximum"].as_i64().expect("limit maximum"),
            );
            for (value, ok) in [(min - 1, false), (min, true), (max, true), (max + 1, false)] {
                let resp = stack.read_get(&format!("{url}?limit={value}"), true);
                if ok {
                    assert_eq!(resp.status, 200, "{path} limit={value}: {}", resp.text());
                    stack.check(path, "GET", &resp);
                } else {
                    stack.check_error(path, "GET", &resp, 400, "invalid_parameter");
                }
            }
        }
    }

    // (c) Error answers, each against the schema the file documents for it.
    let metrics_tpl = "/v1/matches/{match_id}/metrics";
    for (bad, param) in [
        ("bucket=7s", "bucket"),
        ("bucket=2h", "bucket"),
        ("bucket=abc", "bucket"),
        ("from=yesterday", "from"),
        ("from=2&to=1", "to"),
        ("form=1", "query"),
    ] {
        let resp = stack.read_get(&format!("{metrics_path}?{bad}"), false);
        stack.check_error(metrics_tpl, "GET", &resp, 400, "invalid_parameter");
        assert_eq!(resp.json()["param"], param, "{bad}");
    }
    let resp = stack.read_get("/v1/matches/bad%20id/metrics", true);
    stack.check_error(metrics_tpl, "GET", &resp, 400, "invalid_parameter");
    assert_eq!(resp.json()["param"], "match_id");
    let resp = stack.read_get("/v1/matches/oapi-no-such-match/metrics", true);
    stack.check_error(metrics_tpl, "GET", &resp, 404, "unknown_match");
    let resp = stack.read_get("/v1/matches/oapi-no-such-match/live", true);
    stack.check_error(
        "/v1/matches/{match_id}/live",
        "GET",
        &resp,
        404,
        "unknown_match",
    );
    let resp = stack.send("POST", &metrics_path, &[], b"");
    stack.check_error(metrics_tpl, "GET", &resp, 405, "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("GET"));
    let resp = stack.send("DELETE", "/v1/events", &[], b"");
    stack.check_error("/v1/events", "POST", &resp, 405, "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("OPTIONS, POST"));
    let resp = stack.send("POST", "/healthz", &[], b"");
    stack.check_error("/healthz", "GET", &resp, 405, "method_not_allowed");
    let resp = stack.send("PUT", &format!("/matches/{m}"), &[], b"");
    stack.check_error(
        "/matches/{match_id}",
        "GET",
        &resp,
        405,
        "method_not_allowed",
    );

    // Auth: no key, a wrong secret, the wrong role.
    let resp = stack.send("GET", &metrics_path, &[], b"");
    stack.check_error(metrics_tpl, "GET", &resp, 401, "unauthorized");
    let wrong = format!("{}0", &stack.read[..stack.read.len() - 1]);
    let resp = stack.send(
        "GET",
        &metrics_path,
        &[("X-Fanfinity-Key", wrong.as_str())],
        b"",
    );
    stack.check_error(metrics_tpl, "GET", &resp, 401, "unauthorized");
    let ingest_bearer = format!("Bearer {}", stack.ingest);
    let resp = stack.send(
        "GET",
        &metrics_path,
        &[("Authorization", ingest_bearer.as_str())],
        b"",
    );
    stack.check_error(metrics_tpl, "GET", &resp, 403, "forbidden");
    let resp = stack.send(
        "POST",
        "/v1/events",
        &[("Content-Type", "application/json")],
        b"{}",
    );
    stack.check_error("/v1/events", "POST", &resp, 401, "unauthorized");
    let resp = stack.send(
        "POST",
        "/v1/events",
        &[
            ("X-Fanfinity-Key", stack.read.as_str()),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    stack.check_error("/v1/events", "POST", &resp, 403, "forbidden");

    // Event post errors.
    let invalid = json!([{"match_id": m, "user_id": "u1", "type": "chee"}, {"user_id": "u2"}]);
    let resp = stack.post_events("application/json", &[], invalid.to_string().as_bytes());
    stack.check_error("/v1/events", "POST", &resp, 400, "invalid_events");
    let body = resp.json();
    assert_eq!(body["invalid_events"], 2);
    assert!(
        body["details"].as_array().is_some_and(|d| d.len() >= 3),
        "{body}"
    );
    for (content_type, extra, body, status, code) in [
        (
            "application/json",
            None,
            &b"{\"match_id\": "[..],
            400,
            "malformed_json",
        ),
        ("application/json", None, &b""[..], 400, "empty_body"),
        ("application/json", None, &b"[]"[..], 400, "no_events"),
        (
            "application/x-ndjson",
            None,
            &b"\n \n"[..],
            400,
            "empty_body",
        ),
        (
            "application/json",
            Some("gzip"),
            &b"{}"[..],
            400,
            "bad_encoding",
        ),
        (
            "text/xml",
            None,
            &b"<e/>"[..],
            415,
            "unsupported_media_type",
        ),
        (
            "application/json",
            Some("br"),
            &b"{}"[..],
            415,
            "unsupported_encoding",
        ),
    ] {
        let extra: Vec<(&str, &str)> = extra.map(|c| ("Content-Encoding", c)).into_iter().collect();
        let resp = stack.post_events(content_type, &extra, body);
        stack.check_error("/v1/events", "POST", &resp, status, code);
    }

    // CORS preflight: an allowed origin, and one that is not.
    let resp = stack.send("OPTIONS", "/v1/events", &[("Origin", ALLOWED_ORIGIN)], b"");
    assert_eq!(resp.status, 204, "{}", resp.text());
    stack.check("/v1/events", "OPTIONS", &resp);
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let resp = stack.send(
        "OPTIONS",
        "/v1/events",
        &[("Origin", "https://evil.example")],
        b"",
    );
    stack.check_error("/v1/events", "OPTIONS", &resp, 403, "origin_not_allowed");
}
