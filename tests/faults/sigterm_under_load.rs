//! Fault 7 (issue 3): SIGTERM under load.
//!
//! What it proves: a graceful stop answers every connection the server took, including
//! a burst of connections opened around the signal, and a request whose body was half
//! sent when the signal arrived still gets its 202 once the rest comes; the process exits
//! 0 within its configured bounds; and every event answered 202 is in ClickHouse once the
//! server is started again, exactly once after merges.
//!
//! Whether a connection is still in a listener's accept queue at the stop is up to the
//! scheduler, so the burst reaches that case only now and then (the server logs
//! `drained_connections`); the unit test in `src/ingest/server.rs` pins the drain down.
//!
//! The load clients send one request per connection with `Connection: close`, so the
//! rule is strict and per connection: an established connection that ends without a
//! complete HTTP answer (202, or 503 with a JSON body) is a failure. A refused connect
//! means the server is gone, and that client stops.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

const MATCH: &str = "sigterm-m1";
const LOAD_CLIENTS: u16 = 4;
const KEEP_ALIVE_CLIENTS: u16 = 2;
const EVENTS_PER_REQUEST: u32 = 20;
/// Load before the signal.
const LOAD_BEFORE_SIGTERM: Duration = Duration::from_secs(2);
/// The burst client starts this long before the signal, so its connections span the
/// moment the shards stop and fill their accept queues.
const BURST_LEAD: Duration = Duration::from_millis(20);
/// Bound on the burst's open connections (file descriptors).
const BURST_MAX_CONNECTIONS: usize = 3_000;
/// The server's shutdown bounds, set explicitly so the exit limit below follows them.
const GRACE_MS: u64 = 5_000;
const FLUSH_MS: u64 = 5_000;
const SINK_DRAIN_MS: u64 = 5_000;
/// The three stages run one after another, plus 2 s for the process to end around them.
const EXIT_LIMIT: Duration = Duration::from_millis(GRACE_MS + FLUSH_MS + SINK_DRAIN_MS + 2_000);
/// Longest a client waits for an answer on a connection: above the grace, so a
/// connection the server forgot shows up as a timeout, not as a hung test.
const ANSWER_LIMIT: Duration = Duration::from_millis(GRACE_MS + 5_000);
/// A connect whose SYN the stopping server drops is retried by the kernel after about a
/// second and then refused; this only bounds a kernel that behaves otherwise.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// Safety stop for the load clients, should the server never go away.
const LOAD_LIMIT: Duration = Duration::from_secs(20);
/// From start-up until the sink has joined its group and stored the warm-up events.
const SINK_READY_LIMIT: Duration = Duration::from_secs(30);
/// From the restart until every acknowledged event is stored.
const LAND_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn sigterm_under_load_answers_every_request_and_loses_nothing() {
    let names = Names::new("sigterm");
    let settings = [
        format!("http.shutdown_grace_ms={GRACE_MS}"),
        format!("kafka.flush_timeout_ms={FLUSH_MS}"),
        format!("sink.shutdown_drain_ms={SINK_DRAIN_MS}"),
    ];
    let extra: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut server = Server::start("serve", &names, &brokers(), &extra);

    // The sink holds its partitions before the load, so the signal finds it mid-batch.
    let warmup = numbered_ids(99, &mut 0);
    let resp = server.post("application/json", &post_body(&warmup));
    assert_eq!(resp.status, 202, "warm-up: {}", resp.text());
    eventually(SINK_READY_LIMIT, "the warm-up events in ClickHouse", || {
        (stored_ids(&names.database, MATCH).len() == warmup.len()).then_some(())
    });

    let run = load_through_sigterm(&mut server);
    let failures: Vec<&String> = run.reports.iter().flat_map(|r| &r.failures).collect();
    let mut acked: Vec<String> = run
        .reports
        .iter()
        .flat_map(|r| r.acked.iter().cloned())
        .chain(run.keep_alive_acked)
        .chain(warmup)
        .collect();
    acked.sort();
    println!(
        "sigterm: exit {:?} after {:?}; {} events answered 202, {} requests answered 503 \
         ({} burst connections), {} connections without an answer; server said: {}",
        run.exit,
        run.exit_took,
        acked.len(),
        run.reports.iter().map(|r| r.answered_503).sum::<usize>(),
        run.reports.iter().map(|r| r.connections).sum::<usize>(),
        failures.len(),
        shutdown_lines(&server.log)
    );
    assert_eq!(
        run.exit,
        Some(0),
        "clean exit within {EXIT_LIMIT:?} of SIGTERM; log: {}",
        server.log.display()
    );
    assert!(
        failures.is_empty(),
        "connections established but not answered: {failures:#?}"
    );
    assert!(
        run.reports.iter().all(|r| r.refused),
        "every load client ran until the server refused connections"
    );
    assert!(
        acked.len() >= 100,
        "the load ran before the signal ({} acknowledged)",
        acked.len()
    );
    let answered = acked.len();
    acked.dedup();
    assert_eq!(acked.len(), answered, "client ids are unique");

    // The sink of the next start drains what Kafka holds.
    server.spawn();
    server.wait_ready(Duration::from_secs(30));
    assert_stored_exactly_once(&names, &acked);
    drop(server);
    drop_database(&names);
}

/// What the clients saw from the load until the server was gone.
struct SigtermRun {
    /// The exit status, `None` if the process outlived [`EXIT_LIMIT`].
    exit: Option<i32>,
    exit_took: Duration,
    /// The one-request-per-connection clients, the burst client last.
    reports: Vec<LoadReport>,
    /// Ids the keep-alive clients had answered 202, both requests each.
    keep_alive_acked: Vec<String>,
}

/// Runs the load clients, the keep-alive clients with a request half sent, and a burst of
/// connections around the signal; sends SIGTERM after [`LOAD_BEFORE_SIGTERM`] and waits
/// for the exit and for every client to finish.
fn load_through_sigterm(server: &mut Server) -> SigtermRun {
    let addr: SocketAddr = server.addr().parse().expect("server address");
    let load: Vec<_> = (0..LOAD_CLIENTS)
        .map(|c| spawn_load_client(addr, c))
        .collect();
    let terminating = Arc::new(AtomicBool::new(false));
    let (half_sent_tx, half_sent_rx) = mpsc::channel();
    let keep_alive: Vec<_> = (0..KEEP_ALIVE_CLIENTS)
        .map(|c| {
            let client = KeepAliveClient {
                addr,
                client: 100 + c,
                log: server.log.clone(),
                half_sent: half_sent_tx.clone(),
                terminating: Arc::clone(&terminating),
            };
            std::thread::spawn(move || client.run())
        })
        .collect();

    std::thread::sleep(LOAD_BEFORE_SIGTERM);
    for _ in 0..KEEP_ALIVE_CLIENTS {
        half_sent_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every keep-alive client has a request half sent before the signal");
    }
    let burst = spawn_burst_client(addr, 200);
    std::thread::sleep(BURST_LEAD);
    terminating.store(true, Ordering::Relaxed);
    let signalled = Instant::now();
    let exit = server.terminate(EXIT_LIMIT);
    let exit_took = signalled.elapsed();

    let reports = load
        .into_iter()
        .chain([burst])
        .map(|h| h.join().expect("load client thread"))
        .collect();
    let keep_alive_acked = keep_alive
        .into_iter()
        .map(|h| h.join().expect("keep-alive client thread"))
        .flat_map(|result| result.unwrap_or_else(|err| panic!("keep-alive client: {err}")))
        .collect();
    SigtermRun {
        exit,
        exit_took,
        reports,
        keep_alive_acked,
    }
}

/// Waits (bounded) until ClickHouse holds every id of `acked` (sorted), then checks it
/// holds nothing else and, after merges, each exactly once.
fn assert_stored_exactly_once(names: &Names, acked: &[String]) {
    eventually(LAND_LIMIT, "every acknowledged event in ClickHouse", || {
        let stored = stored_ids(&names.database, MATCH);
        acked
            .iter()
            .all(|id| stored.binary_search(id).is_ok())
            .then_some(())
    });
    let expected = acked.len() as u64;
    let (_, unique) = count_and_unique(names);
    assert_eq!(unique, expected, "nothing but the 202'd ids stored");
    clickhouse(&format!("OPTIMIZE TABLE {}.events FINAL", names.database));
    assert_eq!(
        count_and_unique(names),
        (expected, expected),
        "each acknowledged event stored once after merges"
    );
}

/// What one load client saw.
#[derive(Debug, Default)]
struct LoadReport {
    /// Event ids answered 202.
    acked: Vec<String>,
    answered_503: usize,
    /// Connections established that ended without a complete answer, or with one that
    /// breaks the contract.
    failures: Vec<String>,
    /// It stopped because a connect was refused (rather than at [`LOAD_LIMIT`]).
    refused: bool,
    /// Connections it opened (counted by the burst client only).
    connections: usize,
}

/// Posts numbered events from one thread, one request per connection, as fast as
/// answers come, until a connect is refused.
fn spawn_load_client(addr: SocketAddr, client: u16) -> JoinHandle<LoadReport> {
    std::thread::spawn(move || {
        let mut report = LoadReport::default();
        let started = Instant::now();
        let mut next_event = 0u32;
        while started.elapsed() < LOAD_LIMIT {
            let ids = numbered_ids(client, &mut next_event);
            let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_LIMIT) {
                Ok(stream) => stream,
                Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                    report.refused = true;
                    break;
                }
                Err(err) => {
                    // Never established: not an unanswered connection, but unexpected.
                    report.failures.push(format!("connect failed: {err}"));
                    break;
                }
            };
            let request = post_request(&addr, &ids, true);
            // A write error is not final: an answer the server sent is still readable.
            let written = stream.write_all(&request);
            match read_answer(&mut stream) {
                Ok(resp) => judge(&mut report, &ids, &resp),
                Err(reason) => report.failures.push(format!(
                    "client {client}, events from {}: {reason} (write: {written:?})",
                    ids[0]
                )),
            }
        }
        report
    })
}

/// Opens connections as fast as the kernel completes handshakes, each with a whole
/// request sent, and reads no answer until a connect is refused. Connections opened
/// around the signal are still waiting in the listeners' accept queues when the shards
/// stop: the case a plain close would reset.
fn spawn_burst_client(addr: SocketAddr, client: u16) -> JoinHandle<LoadReport> {
    std::thread::spawn(move || {
        let mut report = LoadReport::default();
        let started = Instant::now();
        let mut next_event = 0u32;
        let mut open = Vec::new();
        while open.len() < BURST_MAX_CONNECTIONS && started.elapsed() < LOAD_LIMIT {
            let ids = numbered_ids(client, &mut next_event);
            match TcpStream::connect_timeout(&addr, CONNECT_LIMIT) {
                Ok(mut stream) => {
                    let written = stream.write_all(&post_request(&addr, &ids, true));
                    open.push((stream, ids, written));
                }
                Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                    report.refused = true;
                    break;
                }
                Err(err) => {
                    report.failures.push(format!("burst connect failed: {err}"));
                    break;
                }
            }
        }
        report.connections = open.len();
        for (mut stream, ids, written) in open {
            match read_answer(&mut stream) {
                Ok(resp) => judge(&mut report, &ids, &resp),
                Err(reason) => report.failures.push(format!(
                    "burst, events from {}: {reason} (write: {written:?})",
                    ids[0]
                )),
            }
        }
        report
    })
}

/// Files one complete answer under 202 or 503, or as a failure.
fn judge(report: &mut LoadReport, ids: &[String], resp: &Response) {
    let error_code = serde_json::from_slice::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|body| body["error"].as_str().map(str::to_string));
    match (resp.status, error_code) {
        (202, _) => report.acked.extend(ids.iter().cloned()),
        (503, Some(_)) => report.answered_503 += 1,
        (status, _) => report.failures.push(format!(
            "unexpected answer {status} to events from {}: {}",
            ids[0],
            resp.text()
        )),
    }
}

/// A client on one keep-alive connection: a first request answered 202, then a second
/// one with headers and half its body sent before SIGTERM and the rest after the server
/// began stopping. Returns the ids of both, answered 202.
struct KeepAliveClient {
    addr: SocketAddr,
    client: u16,
    log: PathBuf,
    half_sent: mpsc::Sender<()>,
    terminating: Arc<AtomicBool>,
}

impl KeepAliveClient {
    fn run(self) -> Result<Vec<String>, String> {
        let client = self.client;
        let mut next_event = 0u32;
        let mut stream = TcpStream::connect(self.addr).map_err(|e| format!("connect: {e}"))?;

        let first = numbered_ids(client, &mut next_event);
        let request = post_request(&self.addr, &first, false);
        stream
            .write_all(&request)
            .map_err(|e| format!("send: {e}"))?;
        let resp = read_answer(&mut stream)?;
        if resp.status != 202 {
            return Err(format!("first request: {} {}", resp.status, resp.text()));
        }

        let second = numbered_ids(client, &mut next_event);
        let request = post_request(&self.addr, &second, false);
        let head_end = request
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |at| at + 4);
        let half = head_end + (request.len() - head_end) / 2;
        stream
            .write_all(&request[..half])
            .map_err(|e| format!("send half: {e}"))?;
        let _ = self.half_sent.send(());

        // The rest goes out only once the server is stopping.
        eventually(Duration::from_secs(20), "the SIGTERM", || {
            self.terminating.load(Ordering::Relaxed).then_some(())
        });
        eventually(
            Duration::from_secs(5),
            "the server to log the signal",
            || {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                log.contains("shutdown requested").then_some(())
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        stream
            .write_all(&request[half..])
            .map_err(|e| format!("client {client}: send rest after SIGTERM: {e}"))?;
        let resp = read_answer(&mut stream).map_err(|e| format!("client {client}: {e}"))?;
        if resp.status != 202 {
            return Err(format!(
                "client {client}: request half sent at SIGTERM answered {} {}",
                resp.status,
                resp.text()
            ));
        }
        let mut rest = [0u8; 64];
        match stream.read(&mut rest) {
            Ok(0) => Ok(first.into_iter().chain(second).collect()),
            other => Err(format!(
                "client {client}: connection not closed after its answer: {other:?}"
            )),
        }
    }
}

/// `EVENTS_PER_REQUEST` ids that name their client and number: a missing id says whose
/// request it was. Valid UUIDs (version 4, variant 1).
fn numbered_ids(client: u16, next: &mut u32) -> Vec<String> {
    (0..EVENTS_PER_REQUEST)
        .map(|_| {
            *next += 1;
            format!("00000000-0000-4000-8000-{client:04x}{:08x}", *next)
        })
        .collect()
}

/// A whole POST of `ids` as one buffer, so head and body leave in one write.
fn post_request(addr: &SocketAddr, ids: &[String], close: bool) -> Vec<u8> {
    let body = post_body(ids);
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {connection}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// A JSON array of one `cheer` per id.
fn post_body(ids: &[String]) -> Vec<u8> {
    let events: Vec<_> = ids
        .iter()
        .map(|id| event(id, MATCH, "fan", "cheer"))
        .collect();
    json!(events).to_string().into_bytes()
}

/// Reads one HTTP answer: the head, then `Content-Length` body bytes (to EOF without
/// one). Whatever ends the connection first (EOF, reset, [`ANSWER_LIMIT`]) is the error,
/// with how much had arrived.
fn read_answer(stream: &mut TcpStream) -> Result<Response, String> {
    stream
        .set_read_timeout(Some(ANSWER_LIMIT))
        .map_err(|e| format!("set read timeout: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(resp) = complete_answer(&raw) {
            return Ok(resp);
        }
        match stream.read(&mut chunk) {
            Ok(0) if has_head(&raw) && content_length(&raw).is_none() => {
                return parse_response(&raw).map_err(|e| e.to_string());
            }
            Ok(0) => return Err(format!("EOF after {} bytes of answer", raw.len())),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(format!("{err} after {} bytes of answer", raw.len())),
        }
    }
}

fn has_head(raw: &[u8]) -> bool {
    raw.windows(4).any(|w| w == b"\r\n\r\n")
}

fn content_length(raw: &[u8]) -> Option<usize> {
    let resp = parse_response(raw).ok()?;
    resp.header("content-length")?.parse().ok()
}

/// The answer, once `raw` holds its head and all of its declared body.
fn complete_answer(raw: &[u8]) -> Option<Response> {
    let resp = parse_response(raw).ok()?;
    let declared: usize = resp.header("content-length")?.parse().ok()?;
    (resp.body.len() >= declared).then_some(resp)
}

fn count_and_unique(names: &Names) -> (u64, u64) {
    let text = clickhouse(&format!(
        "SELECT count(), uniqExact(event_id) FROM {}.events WHERE match_id = '{MATCH}' \
         FORMAT TabSeparated",
        names.database
    ));
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse().unwrap_or(u64::MAX));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The server's shutdown lines of the first run, for the test's output.
fn shutdown_lines(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("stopped accepting") || l.contains("deadline hit") || l.contains("drained")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
