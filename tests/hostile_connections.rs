//! Hostile and broken clients at the connection and HTTP/1.1 layer (issue 4), against a
//! real fanfinity over raw TCP: request smuggling shapes, heads hyper's parser refuses,
//! slow and idle clients, the per-shard connection cap and `Expect: 100-continue`. The
//! policy each test holds the server to is docs/connections.md.
#![cfg(feature = "stack-tests")]

mod common;
use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connects with a read timeout, so no test can hang on a silent server.
fn connect(server: &Server, read_timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(read_timeout))
        .expect("read timeout");
    stream
}

/// Reads one response (head, then a `Content-Length` body) off a kept connection.
/// `None` at EOF before any byte.
fn read_response(stream: &mut TcpStream) -> Option<Response> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) if raw.is_empty() => return None,
            Ok(0) => panic!(
                "EOF inside a response head: {:?}",
                String::from_utf8_lossy(&raw)
            ),
            Ok(_) => raw.push(byte[0]),
            Err(err) => panic!("reading a response head: {err}"),
        }
    }
    let mut response = parse_response(&raw).expect("a response head");
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("the response body");
    response.body = body;
    Some(response)
}

/// Asserts the server closed the connection: EOF (a reset counts too) within the read
/// timeout, with no further bytes.
fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{what}: bytes after the answer: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
        Err(err) => panic!("{what}: connection not closed: {err}"),
    }
}

/// Sends raw bytes on a new connection and returns the one answer, checking that the
/// connection is closed after it.
fn answer_then_close(server: &Server, bytes: &[u8], what: &str) -> Response {
    let mut stream = connect(server, Duration::from_secs(10));
    stream.write_all(bytes).expect("send");
    let response = read_response(&mut stream).unwrap_or_else(|| panic!("{what}: no answer"));
    assert_closed(&mut stream, what);
    response
}

fn assert_json_error(response: &Response, status: u16, code: &str, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(response.json()["error"], code, "{what}");
    assert!(response.json()["message"].is_string(), "{what}");
}

fn start(test: &str, extra: &[&str]) -> (Server, Names) {
    let names = Names::new(test);
    let server = Server::start("ingest", &names, &brokers(), extra);
    (server, names)
}

/// RFC 9112, section 6.3: a request with both Content-Length and Transfer-Encoding may
/// be an attempt to smuggle a second request; it is refused with 400 and the connection
/// closed, so the bytes behind it are never read as a request of their own. A request
/// framed by Transfer-Encoding alone is served as usual.
#[test]
fn smuggling_shaped_request_gets_one_answer_then_eof() {
    let (server, _names) = start("smuggle", &[]);
    let smuggled = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    for (order, head) in [
        (
            "cl first",
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "te first",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        ),
    ] {
        let request = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {head}\r\n0\r\n\r\n{smuggled}"
        );
        let response = answer_then_close(&server, request.as_bytes(), order);
        assert_json_error(&response, 400, "conflicting_length", order);
        assert_eq!(response.header("connection"), Some("close"), "{order}");
    }

    // The same shape split over many writes is caught too.
    let mut stream = connect(&server, Duration::from_secs(10));
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    for piece in request.as_bytes().chunks(7) {
        // The answer comes once the head is complete; later pieces may meet a closed
        // connection, which is the point.
        if stream.write_all(piece).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let response = read_response(&mut stream).expect("an answer");
    assert_json_error(&response, 400, "conflicting_length", "trickled");
    assert_closed(&mut stream, "trickled");

    // Chunked alone is fine, and the connection stays usable.
    let body = serde_json::to_vec(&event(&new_id(), "m-chunked", "u1", "cheer")).expect("json");
    let mut stream = connect(&server, Duration::from_secs(10));
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send head");
    stream.write_all(&body).expect("send chunk");
    stream
        .write_all(b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send the end and a second request");
    let response = read_response(&mut stream).expect("an answer");
    assert_eq!(response.status, 202, "chunked alone: {}", response.text());
    assert_eq!(read_response(&mut stream).expect("second").status, 200);

    let request = "POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\
                   Content-Type: application/json\r\n\r\n";
    let response = answer_then_close(&server, request.as_bytes(), "te not chunked");
    assert_json_error(&response, 400, "malformed_request", "te not chunked");

    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\
         Content-Type: application/json\r\n\r\n{{}}{smuggled}"
    );
    let response = answer_then_close(&server, request.as_bytes(), "two lengths");
    assert_json_error(&response, 400, "malformed_request", "two lengths");
}

/// hyper refuses some heads itself; every such answer carries fanfinity's JSON body and
/// the connection is closed (RFC 9112, sections 2.2, 3 and 5).
#[test]
fn parser_refusals_carry_json_bodies_and_close() {
    let (server, _names) = start("parser", &[]);

    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let response = answer_then_close(&server, big.as_bytes(), "oversized header");
    assert_json_error(&response, 431, "headers_too_large", "oversized header");

    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let response = answer_then_close(&server, many.as_bytes(), "too many headers");
    assert_json_error(&response, 431, "headers_too_large", "too many headers");

    for (what, bytes) in [
        ("not http", &b"HELLO THERE\r\n\r\n"[..]),
        (
            "bad version",
            &b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "space in target",
            &b"GET /heal thz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "bad header name",
            &b"GET /healthz HTTP/1.1\r\nBad Name: v\r\n\r\n"[..],
        ),
        (
            "te on http/1.0",
            &b"POST /v1/events HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        ),
    ] {
        let response = answer_then_close(&server, bytes, what);
        assert_json_error(&response, 400, "malformed_request", what);
    }

    // An unknown method on a known path is a 405 with Allow, on a kept connection.
    let mut stream = connect(&server, Duration::from_secs(10));
    stream
        .write_all(
            b"BREW /v1/events HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("send");
    let brew = read_response(&mut stream).expect("an answer to BREW");
    assert_json_error(&brew, 405, "method_not_allowed", "BREW");
    assert_eq!(brew.header("allow"), Some("POST"));
    let next = read_response(&mut stream).expect("the next request is served");
    assert_eq!(next.status, 200);

    // HTTP/1.0 without keep-alive: one answer, then close (RFC 9112, section 9.3).
    let response = answer_then_close(&server, b"GET /healthz HTTP/1.0\r\n\r\n", "http/1.0");
    assert_eq!(response.status, 200);
}

/// A request head must arrive within `http.header_read_timeout_ms`, counted from the
/// accept: a trickling client cannot stretch it, and gets 408 with a JSON body.
#[test]
fn slow_request_head_gets_408_json_then_close() {
    let (server, _names) = start(
        "header_timeout",
        &[
            "http.header_read_timeout_ms=1000",
            "http.idle_timeout_ms=60000",
        ],
    );

    let started = Instant::now();
    let mut trickler = connect(&server, Duration::from_secs(10));
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    trickler.write_all(head).expect("send");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        if trickler.write_all(b"a").is_err() {
            break;
        }
    }
    let response = read_response(&mut trickler).expect("a 408");
    assert_json_error(&response, 408, "header_timeout", "trickled head");
    assert_closed(&mut trickler, "trickled head");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "408 after {took:?}");

    // A connection that sends nothing at all gets the same.
    let mut silent = connect(&server, Duration::from_secs(10));
    let response = read_response(&mut silent).expect("a 408 on a silent connection");
    assert_json_error(&response, 408, "header_timeout", "silent");
    assert_closed(&mut silent, "silent");
}

/// A keep-alive connection idle for `http.idle_timeout_ms` is closed without an answer
/// (RFC 9112, section 9.5); the timer starts again after every answer.
#[test]
fn idle_keep_alive_connection_is_closed_without_an_answer() {
    let (server, _names) = start(
        "idle_timeout",
        &[
            "http.idle_timeout_ms=1500",
            "http.header_read_timeout_ms=10000",
        ],
    );
    let mut stream = connect(&server, Duration::from_secs(10));
    for _ in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        assert_eq!(read_response(&mut stream).expect("answer").status, 200);
        std::thread::sleep(Duration::from_millis(800));
    }
    let idle_from = Instant::now();
    assert_closed(&mut stream, "idle connection");
    let idle = idle_from.elapsed();
    assert!(
        idle < Duration::from_secs(3),
        "closed {idle:?} after going idle"
    );
}

/// Past `http.max_connections_per_shard`, a new connection is answered 503
/// `too_many_connections` with Retry-After and closed; the connections already open
/// are served as before, and the refusals are counted in /metrics.
#[test]
fn connections_over_the_cap_get_503_and_open_ones_keep_working() {
    let (server, _names) = start("conn_cap", &["http.max_connections_per_shard=4"]);

    // Two shards with 4 each: of 16 connections at least 8 are refused.
    let mut kept = Vec::new();
    let mut refused = 0;
    let streams: Vec<TcpStream> = (0..16)
        .map(|_| connect(&server, Duration::from_millis(400)))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for mut stream in streams {
        let mut first = [0u8; 1];
        match stream.peek(&mut first) {
            Ok(n) if n > 0 => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let response = read_response(&mut stream).expect("a 503");
                assert_json_error(&response, 503, "too_many_connections", "over the cap");
                assert_eq!(response.header("retry-after"), Some("1"));
                assert_closed(&mut stream, "over the cap");
                refused += 1;
            }
            Ok(_) => panic!("a connection closed without an answer"),
            Err(_) => kept.push(stream),
        }
    }
    assert!(refused >= 8, "only {refused} of 16 refused");
    assert!(kept.len() <= 8, "{} connections kept", kept.len());

    for stream in &mut kept {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send on a kept connection");
        assert_eq!(read_response(stream).expect("answer").status, 200);
    }
    drop(kept);

    let metrics = eventually(Duration::from_secs(5), "a scrape", || {
        let resp = server.get("/metrics");
        (resp.status == 200).then(|| resp.text())
    });
    let refused_counted: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("fanfinity_http_connections_closed_total")
                && l.contains("reason=\"too_many_connections\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    // A scrape that met a still-full shard was refused too, and counted.
    assert!(refused_counted >= refused as u64, "{metrics}");
    assert!(metrics.contains("fanfinity_http_open_connections{shard=\"0\"}"));
}

/// `Expect: 100-continue` is answered with 100 as soon as the handler reads the body;
/// a request refused on its head (a Content-Length over `http.max_body_bytes`) gets its
/// 413 without a 100 first (RFC 9110, section 10.1.1).
#[test]
fn expect_continue_is_answered_and_skipped_for_refused_heads() {
    let (server, _names) = start("expect", &["http.max_body_bytes=2000"]);
    let body = serde_json::to_vec(&event(&new_id(), "m-expect", "u1", "cheer")).expect("json");

    let mut stream = connect(&server, Duration::from_secs(5));
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("send head");
    let started = Instant::now();
    let interim = read_response(&mut stream).expect("100 Continue");
    assert_eq!(interim.status, 100);
    assert!(started.elapsed() < Duration::from_secs(1));
    stream.write_all(&body).expect("send body");
    let answer = read_response(&mut stream).expect("the final answer");
    assert_eq!(answer.status, 202, "{}", answer.text());

    let mut stream = connect(&server, Duration::from_secs(5));
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
        )
        .expect("send head");
    let answer = read_response(&mut stream).expect("an answer");
    assert_json_error(&answer, 413, "payload_too_large", "oversized with expect");
}

/// Raises this test process's open-file limit to its hard limit: 2,000 client sockets
/// would pass a default soft limit of 1,024.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Posts `count` single events, each on its own connection, and returns the slowest
/// and the total time.
fn timed_posts(server: &Server, count: usize) -> (Duration, Duration) {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..count {
        let body = serde_json::to_vec(&event(&new_id(), "m-slow", &format!("u{i}"), "cheer"))
            .expect("json");
        let one = Instant::now();
        let response = server.post("application/json", &body);
        assert_eq!(response.status, 202, "{}", response.text());
        slowest = slowest.max(one.elapsed());
    }
    (slowest, started.elapsed())
}

/// 2,000 connections trickling their request heads a byte every two seconds must not
/// slow normal clients down: each shard's executor only wakes for the bytes that come,
/// and a connection costs a task and a buffer, not a thread.
#[test]
fn two_thousand_slow_clients_do_not_slow_normal_ones() {
    const SLOW: usize = 2_000;
    const POSTS: usize = 200;
    raise_nofile();
    let (server, _names) = start(
        "slowloris",
        // Long enough that no slow client is timed out during the measurement.
        &["http.header_read_timeout_ms=120000"],
    );
    timed_posts(&server, 20); // warm up the producer and the connections path
    let (_, baseline) = timed_posts(&server, POSTS);

    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|i| {
            let mut stream = TcpStream::connect(server.addr()).expect("connect a slow client");
            stream
                .write_all(
                    format!("POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ").as_bytes(),
                )
                .expect("start a slow head");
            stream
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for stream in &mut slow {
                    let _ = stream.write_all(b"a");
                }
                for _ in 0..20 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            slow
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let (slowest, with_slow) = timed_posts(&server, POSTS);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let slow = trickle.join().expect("trickler");

    let metrics = server.get("/metrics").text();
    let open: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("fanfinity_http_open_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    drop(slow);
    println!(
        "{POSTS} posts: {baseline:?} alone, {with_slow:?} beside {SLOW} slow clients \
         (slowest {slowest:?}); open connections at the end: {open}"
    );
    assert!(
        open >= SLOW as u64,
        "the slow clients were not all open: {open}"
    );
    assert!(
        with_slow < baseline * 3 + Duration::from_secs(1),
        "normal clients slowed down: {with_slow:?} against {baseline:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest post took {slowest:?}"
    );
}

/// A fanfinity started by hand, for settings under which `Server::start` cannot probe
/// readiness (it asks the public listener for `/readyz`); killed when dropped.
struct HandStarted(std::process::Child);

impl Drop for HandStarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `http.admin_listen` set, the operational endpoints answer only there, and the
/// public listener answers 404 for them; the admin listener serves nothing else.
#[test]
fn admin_listener_takes_the_operational_endpoints() {
    let names = Names::new("admin");
    let (port, admin_port) = (free_port(), free_port());
    let (public, admin) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{admin_port}"),
    );
    let mut sets = names.settings(&brokers());
    sets.push(format!("http.listen=\"{public}\""));
    sets.push(format!("http.admin_listen=\"{admin}\""));
    let log_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let log = std::fs::File::create(log_dir.join(format!("{}-admin.log", names.database)))
        .expect("log file");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fanfinity"));
    command.args(["ingest", "--shards", "2"]);
    for set in &sets {
        command.args(["--set", set]);
    }
    let _server = HandStarted(
        command
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fanfinity"),
    );
    eventually(
        Duration::from_secs(60),
        "readiness on the admin listener",
        || {
            let resp = try_request(&admin, "GET", "/readyz", &[], b"").ok()?;
            (resp.status == 200).then_some(())
        },
    );

    for path in ["/healthz", "/readyz", "/metrics"] {
        let on_public = request(&public, "GET", path, &[], b"");
        assert_json_error(&on_public, 404, "not_found", path);
        let on_admin = request(&admin, "GET", path, &[], b"");
        assert_eq!(on_admin.status, 200, "{path} on the admin listener");
    }
    let events = request(&admin, "POST", "/v1/events", &[], b"[]");
    assert_json_error(&events, 404, "not_found", "events on the admin listener");
    let body = serde_json::to_vec(&event(&new_id(), "m-admin", "u1", "cheer")).expect("json");
    let posted = request(
        &public,
        "POST",
        "/v1/events",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(posted.status, 202, "{}", posted.text());
}

/// Reads every shard's `fanfinity_http_open_connections` gauge.
fn open_connections_by_shard(server: &Server) -> Vec<u64> {
    let text = server.get("/metrics").text();
    text.lines()
        .filter(|line| line.starts_with("fanfinity_http_open_connections{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// A load balancer's few long-lived connections end up evenly spread over the shards
/// (SO_REUSEPORT alone left one of two shards without any of 4 connections in 6 of 40
/// trials; `ingest/balance.rs`), and a connection handed to another shard serves posts
/// like any other.
#[test]
fn few_long_lived_connections_are_spread_evenly_and_all_serve() {
    let (server, _names) = start("balance", &[]);
    for round in 0..3 {
        let mut clients: Vec<TcpStream> = (0..8)
            .map(|_| connect(&server, Duration::from_secs(10)))
            .collect();
        let post = |stream: &mut TcpStream, what: &str| {
            let body =
                serde_json::to_vec(&event(&new_id(), "m-balance", "u1", "cheer")).expect("json");
            let head = format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).expect("write head");
            stream.write_all(&body).expect("write body");
            let response = read_response(stream).unwrap_or_else(|| panic!("{what}: no answer"));
            assert_eq!(response.status, 202, "{what}: {}", response.text());
        };
        for (i, stream) in clients.iter_mut().enumerate() {
            post(
                stream,
                &format!("round {round}, first post on connection {i}"),
            );
        }
        // The scrape's own connection is counted too: 9 in all, at most one apart.
        let open = open_connections_by_shard(&server);
        assert_eq!(open.iter().sum::<u64>(), 9, "round {round}: {open:?}");
        let (most, least) = (open.iter().max(), open.iter().min());
        assert!(
            most.zip(least).is_some_and(|(m, l)| m - l <= 1),
            "round {round}: connections per shard {open:?}"
        );
        for (i, stream) in clients.iter_mut().enumerate() {
            post(
                stream,
                &format!("round {round}, second post on connection {i}"),
            );
        }
        drop(clients);
        eventually(Duration::from_secs(5), "connections closed", || {
            (open_connections_by_shard(&server).iter().sum::<u64>() <= 1).then_some(())
        });
    }
}

/// Reads everything the server still sends until EOF or the read timeout, as text.
fn read_rest(stream: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(err) if err.kind() == ErrorKind::ConnectionReset => break,
            Err(err) => panic!("reading: {err}"),
        }
    }
    String::from_utf8_lossy(&rest).into_owned()
}

/// A complete `POST /v1/events` carrying one event with `id`.
fn post_bytes(id: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&event(id, "m-smuggle", "u1", "cheer")).expect("json");
    let mut bytes = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// RFC 9112, section 9.3: a body the handler refused without reading is drained or the
/// connection closed; it is never read as the next request. Between requests a
/// connection is taken out of hyper (`connection.rs`), which must wait for the body to
/// be off the socket. Each refusal below answers before reading the body, and the body
/// is itself a complete request that must not be served.
#[test]
fn an_unread_refused_body_is_never_served_as_a_request() {
    let (server, _names) = start("unread", &[]);
    for (what, head) in [
        (
            "404",
            "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
        ),
        (
            "415",
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n",
        ),
        (
            "415 with Expect",
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n\
             Expect: 100-continue\r\n",
        ),
    ] {
        let hidden = new_id();
        let body = post_bytes(&hidden);
        let mut stream = connect(&server, Duration::from_secs(2));
        let head = format!("{head}Content-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).expect("head");
        // Once as a second segment after the answer could have gone out, once at once.
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(&body).expect("body");
        let answers = read_rest(&mut stream);
        assert!(
            !answers.contains(" 202 ") && !answers.contains(&hidden),
            "{what}: the body was served as a request: {answers}"
        );
        let refused = what.split(' ').next().unwrap_or_default();
        assert!(
            answers.starts_with(&format!("HTTP/1.1 {refused} ")),
            "{what}: {answers}"
        );
    }
}

/// hyper serves at most 16 pipelined requests per poll; the connection must carry every
/// byte it has not parsed yet to the next hyper connection, so 300 pipelined requests in
/// one write get 300 answers, in order.
#[test]
fn three_hundred_pipelined_requests_all_get_answers() {
    let (server, _names) = start("pipeline", &[]);
    let mut stream = connect(&server, Duration::from_secs(10));
    let one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let all: Vec<u8> = one.iter().copied().cycle().take(one.len() * 300).collect();
    stream.write_all(&all).expect("pipeline");
    for n in 0..300 {
        let response =
            read_response(&mut stream).unwrap_or_else(|| panic!("EOF after {n} of 300 answers"));
        assert_eq!(response.status, 200, "answer {n}: {}", response.text());
    }
}

/// A client that shuts its sending side once the request is out still gets the answer
/// (RFC 9112, section 9.6; hyper's `half_close`), and the event is accepted.
#[test]
fn a_half_closed_client_still_gets_its_answer() {
    let (server, _names) = start("halfclose", &[]);
    let mut stream = connect(&server, Duration::from_secs(10));
    let id = new_id();
    stream.write_all(&post_bytes(&id)).expect("request");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half close");
    let response = read_response(&mut stream).expect("an answer after the half-close");
    assert_eq!(response.status, 202, "{}", response.text());
    assert!(response.text().contains(&id), "{}", response.text());
}
