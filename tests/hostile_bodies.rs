//! Hostile request bodies against a real server over raw TCP (issue 4): gzip and its
//! failures, decompression bombs, records too large for Kafka, content types, bodies that
//! stop arriving, chunked bodies past the limit, JSON that is not JSON, and timestamps.
//! The policy each test checks is docs/input-policy.md. Run with `make test` (the stack
//! must be up: `make stack-up`).

#![cfg(feature = "stack-tests")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;

const LAND: Duration = Duration::from_secs(60);

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).expect("compress in memory");
    encoder.finish().expect("finish in memory")
}

fn post_encoded(server: &Server, content_type: &str, encoding: &str, body: &[u8]) -> Response {
    request(
        &server.addr(),
        "POST",
        "/v1/events",
        &[
            ("Content-Type", content_type),
            ("Content-Encoding", encoding),
        ],
        body,
    )
}

fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(resp.status, status, "{code}: {}", resp.text());
    assert_eq!(resp.json()["error"], code, "{}", resp.text());
}

/// Reads whatever the server sends until it closes (or errors, as after a reset), and
/// parses it; a client library would hide a reset or a missing `Connection: close`.
fn read_answer(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_response(&raw).unwrap_or_else(|err| {
        panic!("{err}: {:?}", String::from_utf8_lossy(&raw));
    })
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("write timeout");
    stream
}

fn one_event(match_id: &str) -> (String, Vec<u8>) {
    let id = new_id();
    let body = event(&id, match_id, "fan-1", "cheer")
        .to_string()
        .into_bytes();
    (id, body)
}

#[test]
fn gzip_bodies_are_read_whole_or_refused_whole() {
    let names = Names::new("gzip");
    let server = Server::start(
        "ingest",
        &names,
        &brokers(),
        &["kafka.max_message_bytes=2000"],
    );
    let m = "gzip-m1";
    let mut accepted = Vec::new();

    // One member, and an array split across two members: both must be read.
    let (id, body) = one_event(m);
    let resp = post_encoded(&server, "application/json", "gzip", &gzip(&body));
    assert_eq!(resp.status, 202, "{}", resp.text());
    accepted.push(id);
    let ids = [new_id(), new_id()];
    let array = json!([
        event(&ids[0], m, "fan-2", "cheer"),
        event(&ids[1], m, "fan-3", "view")
    ])
    .to_string();
    let (head, tail) = array.split_at(array.len() / 2);
    let mut two_members = gzip(head.as_bytes());
    two_members.extend(gzip(tail.as_bytes()));
    let resp = post_encoded(&server, "application/json", "x-gzip", &two_members);
    assert_eq!(resp.status, 202, "{}", resp.text());
    assert_eq!(resp.json()["accepted"], 2);
    accepted.extend(ids);

    // Truncated, corrupt, or plain text labelled gzip: 400 bad_encoding.
    let (_, body) = one_event(m);
    let whole = gzip(&body);
    let mut corrupt = whole.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    for bad in [&whole[..whole.len() - 8], &corrupt[..], &body[..]] {
        let resp = post_encoded(&server, "application/json", "gzip", bad);
        assert_error(&resp, 400, "bad_encoding");
    }
    // gzip sent without its header is not JSON, and the message says why.
    let resp = server.post("application/json", &whole);
    assert_error(&resp, 400, "malformed_json");
    assert!(resp.text().contains("Content-Encoding"), "{}", resp.text());
    // An empty body is empty however it is encoded.
    let resp = post_encoded(&server, "application/json", "gzip", &gzip(b""));
    assert_error(&resp, 400, "empty_body");

    // Codings we do not speak: 415 naming them, with Accept-Encoding.
    for coding in ["br", "deflate", "zstd", "gzip, gzip"] {
        let resp = post_encoded(&server, "application/json", coding, &body);
        assert_error(&resp, 415, "unsupported_encoding");
        assert!(resp.text().contains(coding), "{}", resp.text());
        assert_eq!(resp.header("accept-encoding"), Some("gzip"));
    }

    // An event whose record would pass kafka.max_message_bytes: 413 naming it, and the
    // small event beside it is not produced either.
    let big = json!([
        event(&new_id(), m, "fan-4", "cheer"),
        {"event_id": new_id(), "match_id": m, "user_id": "fan-5", "type": "chat",
         "payload": {"text": "x".repeat(3000)}}
    ]);
    let resp = server.post("application/json", big.to_string().as_bytes());
    assert_error(&resp, 413, "event_too_large");
    assert!(resp.text().contains("event 1"), "{}", resp.text());

    // The marker comes last on the match's partition: reading up to it shows every
    // record produced for the match, which must be exactly the accepted ones.
    let (marker, body) = one_event(m);
    assert_eq!(server.post("application/json", &body).status, 202);
    accepted.push(marker);
    let topic = format!("{}.events", names.prefix);
    let records = read_topic(&brokers(), &topic, accepted.len(), LAND);
    let mut produced: Vec<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("record json");
            v["event_id"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    produced.sort();
    accepted.sort();
    assert_eq!(produced, accepted, "only accepted events may reach Kafka");
}

#[test]
fn compressed_bodies_are_bounded_before_and_while_inflating() {
    let names = Names::new("bomb");
    let server = Server::start("ingest", &names, &brokers(), &[]);
    let pid = server.child.as_ref().map(|c| c.id()).expect("server pid");
    let peak_rss_kb = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
    };

    // 10 MB of zeros is about 10 KB compressed; it must stop at 1 MiB, quickly.
    let small_bomb = gzip(&vec![0u8; 10_000_000]);
    assert!(small_bomb.len() < 20_000, "{} bytes", small_bomb.len());
    let started = Instant::now();
    let resp = post_encoded(&server, "application/json", "gzip", &small_bomb);
    assert_error(&resp, 413, "payload_too_large");
    assert!(resp.text().contains("decompressed"), "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    eprintln!(
        "10 MB bomb ({} bytes): 413 in {:?}",
        small_bomb.len(),
        started.elapsed()
    );

    // 800 MiB of zeros, under 1 MiB compressed, four times over: memory stays flat.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..800 {
        encoder.write_all(&zeros).expect("compress");
    }
    let big_bomb = encoder.finish().expect("finish");
    assert!(big_bomb.len() < 1024 * 1024, "{} bytes", big_bomb.len());
    let before = peak_rss_kb();
    for _ in 0..4 {
        let started = Instant::now();
        let resp = post_encoded(&server, "application/json", "gzip", &big_bomb);
        assert_error(&resp, 413, "payload_too_large");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let grown_kb = peak_rss_kb().saturating_sub(before);
    eprintln!(
        "800 MiB bomb ({} bytes) x4: peak RSS {before} kB -> +{grown_kb} kB",
        big_bomb.len()
    );
    assert!(grown_kb < 32 * 1024, "peak RSS grew {grown_kb} kB");

    // The compressed size is bounded too: 2 MB declared is refused before it is read
    // (only the head is sent; the answer must come anyway).
    let mut stream = connect(&server);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Encoding: gzip\r\nContent-Length: 2000000\r\n\r\n",
        server.addr()
    );
    stream.write_all(head.as_bytes()).expect("head");
    let resp = read_answer(&mut stream);
    assert_error(&resp, 413, "payload_too_large");
    assert_eq!(resp.header("connection"), Some("close"));

    let (_, body) = one_event("bomb-m1");
    assert_eq!(server.post("application/json", &body).status, 202);
}

#[test]
fn bodies_that_stop_arriving_get_408_and_a_closed_connection() {
    let names = Names::new("stall");
    let server = Server::start(
        "ingest",
        &names,
        &brokers(),
        &["http.body_read_timeout_ms=1000"],
    );
    let addr = server.addr();
    let (_, body) = one_event("stall-m1");

    // Headers and part of a declared body.
    let mut stream = connect(&server);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&body[..10]).expect("part");
    let resp = read_answer(&mut stream);
    let waited = started.elapsed();
    eprintln!("stalled body: 408 after {waited:?}");
    assert_error(&resp, 408, "request_timeout");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A chunked body whose last chunk never comes.
    let mut stream = connect(&server);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&body).expect("chunk");
    stream.write_all(b"\r\n").expect("chunk end");
    let resp = read_answer(&mut stream);
    assert_error(&resp, 408, "request_timeout");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The in-flight slots came back: a normal post still gets through.
    assert_eq!(server.post("application/json", &body).status, 202);
}

#[test]
fn a_chunked_body_past_the_limit_is_refused_while_it_streams() {
    let names = Names::new("chunked");
    let server = Server::start("ingest", &names, &brokers(), &[]);
    let mut stream = connect(&server);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        server.addr()
    );
    stream.write_all(head.as_bytes()).expect("head");

    // 256 MiB in 64 KiB chunks, written by another thread while this one waits for the
    // answer; the server must answer long before the last chunk.
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 4096;
    let sent = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let mut writer_stream = stream.try_clone().expect("clone stream");
    let writer = {
        let (sent, finished) = (Arc::clone(&sent), Arc::clone(&finished));
        std::thread::spawn(move || {
            let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
            chunk.extend(std::iter::repeat_n(b' ', CHUNK));
            chunk.extend_from_slice(b"\r\n");
            for _ in 0..CHUNKS {
                if writer_stream.write_all(&chunk).is_err() {
                    return;
                }
                sent.fetch_add(CHUNK, Ordering::Relaxed);
            }
            let _ = writer_stream.write_all(b"0\r\n\r\n");
            finished.store(true, Ordering::Relaxed);
        })
    };
    let resp = read_answer(&mut stream);
    let sent_at_answer = sent.load(Ordering::Relaxed);
    eprintln!("chunked body: 413 after the client had written {sent_at_answer} bytes");
    assert_error(&resp, 413, "payload_too_large");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        sent_at_answer < 64 * 1024 * 1024,
        "answered only after {sent_at_answer} bytes"
    );
    writer.join().expect("writer thread");
    assert!(
        !finished.load(Ordering::Relaxed),
        "the whole body was taken"
    );

    let (_, body) = one_event("chunked-m1");
    assert_eq!(server.post("application/json", &body).status, 202);
}

#[test]
fn json_that_is_not_json_is_refused_fast_and_harms_nothing() {
    let names = Names::new("json");
    let server = Server::start("ingest", &names, &brokers(), &[]);
    let with = |value: &str| {
        format!(
            r#"{{"match_id":"json-m1","user_id":"u","type":"cheer","payload":{{"x":{value}}}}}"#
        )
        .into_bytes()
    };
    let mut invalid_utf8 = with(r#""ab""#);
    let at = invalid_utf8.len() - 4;
    invalid_utf8.insert(at, 0xc3);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("lone high surrogate", with(r#""\ud800""#)),
        ("lone low surrogate", with(r#""\udc00""#)),
        (
            "surrogate in user_id",
            br#"{"match_id":"json-m1","user_id":"\ud83d","type":"cheer"}"#.to_vec(),
        ),
        ("invalid utf-8", invalid_utf8),
        ("100,000 levels", "[".repeat(100_000).into_bytes()),
        (
            "100,000 closed levels",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
        ("NaN", with("NaN")),
        ("Infinity", with("Infinity")),
        ("-Infinity", with("-Infinity")),
        ("leading zero", with("01")),
        ("trailing comma in object", with("{\"a\":1,}")),
        ("trailing comma in array", with("[1,]")),
    ];
    for (what, body) in cases {
        let started = Instant::now();
        let resp = server.post("application/json", &body);
        let took = started.elapsed();
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        assert_eq!(
            resp.json()["error"],
            "malformed_json",
            "{what}: {}",
            resp.text()
        );
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    }
    // NUL and C1 controls in ids are refused per field, not as JSON.
    let resp = server.post(
        "application/json",
        br#"{"match_id":"json-m1","user_id":"fan\u0000","type":"cheer"}"#,
    );
    assert_error(&resp, 400, "invalid_events");
    assert_eq!(resp.json()["details"][0]["field"], "user_id");

    // Content types: the JSON family, sendBeacon's text/plain, NDJSON; not the rest.
    let (_, body) = one_event("json-m1");
    for content_type in [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain;charset=UTF-8",
        "application/x-ndjson",
        "application/ndjson",
    ] {
        let resp = server.post(content_type, &body);
        assert_eq!(resp.status, 202, "{content_type}: {}", resp.text());
    }
    for content_type in [
        "text/html",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        assert_error(
            &server.post(content_type, &body),
            415,
            "unsupported_media_type",
        );
    }
    assert_error(&server.post("text/plain", b""), 400, "empty_body");
    assert_error(
        &server.post("application/json", b" \r\n"),
        400,
        "empty_body",
    );
    assert_error(&server.post("application/json", b"[]"), 400, "no_events");
    assert_error(
        &server.post("application/x-ndjson", b"\n\n"),
        400,
        "empty_body",
    );
}

#[test]
fn timestamps_are_normalized_to_utc_or_refused() {
    let names = Names::new("ts");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "ts-m1";
    let with_ts = |ts: serde_json::Value| {
        json!({"match_id": m, "user_id": "fan-1", "type": "cheer", "ts": ts}).to_string()
    };
    for bad in [
        json!("2022-12-18T15:23:20"),
        json!("2022-13-01T00:00:00Z"),
        json!(""),
        json!(1_671_377_000),
        json!(1_671_377_000_000_000i64),
        json!(1_671_377_000_000.5),
        json!("2100-01-01T00:00:00Z"),
        json!("1969-12-31T23:59:59Z"),
    ] {
        let resp = server.post("application/json", with_ts(bad.clone()).as_bytes());
        assert_error(&resp, 400, "invalid_events");
        assert_eq!(resp.json()["details"][0]["field"], "ts", "{bad}");
    }

    // Accepted forms, with odd but valid strings, and a client `received_at` that must be
    // ignored: all land in ClickHouse with the server's time.
    let cases = [
        (json!("2022-12-18T15:23:20Z"), 1_671_377_000_000i64),
        (json!("2022-12-18T18:23:20.250+03:00"), 1_671_377_000_250),
        (json!(1_671_377_000_999i64), 1_671_377_000_999),
    ];
    let mut ids = Vec::new();
    let posted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    for (ts, _) in &cases {
        let id = new_id();
        let body = json!({"event_id": id, "match_id": m, "user_id": "fan \u{1F600} é",
            "type": "chat", "ts": ts, "received_at": 5,
            "payload": {"text": "nul\u{0}here \u{2028}", "deep": {"a": [[1]]}}});
        let resp = server.post("application/json", body.to_string().as_bytes());
        assert_eq!(resp.status, 202, "{ts}: {}", resp.text());
        ids.push(id);
    }
    wait_for_ids(&names, m, cases.len(), LAND);
    for (id, (_, want_ms)) in ids.iter().zip(&cases) {
        let row = clickhouse(&format!(
            "SELECT client_ts_ms, received_at_ms, user_id, payload FROM {}.events \
             WHERE event_id = toUUID('{id}') FORMAT JSONEachRow",
            names.database
        ));
        let row: serde_json::Value = serde_json::from_str(row.trim()).expect("row json");
        // ClickHouse quotes 64-bit integers in JSON by default; accept either form.
        let int = |v: &serde_json::Value| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|t| t.parse().ok()))
        };
        assert_eq!(int(&row["client_ts_ms"]), Some(*want_ms), "{row}");
        let received = int(&row["received_at_ms"]).expect("received_at_ms");
        assert!(
            (received - posted_ms).abs() < 120_000,
            "{received} vs {posted_ms}"
        );
        assert_eq!(row["user_id"], "fan \u{1F600} é");
        let payload: serde_json::Value =
            serde_json::from_str(row["payload"].as_str().expect("payload")).expect("json");
        assert_eq!(payload["text"], "nul\u{0}here \u{2028}");
    }
    drop(server);
    drop_database(&names);
}
