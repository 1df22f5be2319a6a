//! Test harness for black-box tests against the real local stack (`make stack-up`):
//! starts `fanfinity` processes with private topics, consumer group and database, talks
//! to them over raw HTTP/1.1, and reads ClickHouse over its HTTP interface.
//!
//! Addresses come from the environment so CI and developers can move the stack:
//! `TEST_KAFKA_BROKERS` (default 127.0.0.1:19092), `TEST_CLICKHOUSE_URL`
//! (default http://127.0.0.1:18123), `TEST_TANSU_BIN` (default
//! target/stack/bin/tansu, for tests that run a broker of their own).

#![allow(dead_code)]

pub mod private_clickhouse;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

pub fn tansu_bin() -> PathBuf {
    std::env::var("TEST_TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/stack/bin/tansu")
        })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Names private to one test: topics, group, database.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
    pub database: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 100_000_000)
            .unwrap_or(0);
        let tag = format!("{test}_{}_{n}_{stamp}", std::process::id());
        Self {
            prefix: format!("t.{tag}"),
            database: format!("t_{tag}"),
        }
    }

    /// `--set` arguments that point a fanfinity process at these names.
    pub fn settings(&self, brokers: &str) -> Vec<String> {
        vec![
            format!("kafka.brokers=\"{brokers}\""),
            format!("kafka.topic=\"{}.events\"", self.prefix),
            format!("kafka.retry_topic=\"{}.events.retry\"", self.prefix),
            format!("kafka.dead_topic=\"{}.events.dead\"", self.prefix),
            format!("consumer.group_id=\"{}.sink\"", self.prefix),
            format!("clickhouse.url=\"{}\"", clickhouse_url()),
            format!("clickhouse.database=\"{}\"", self.database),
            // Keys are tested in tests/auth.rs; here they would only add noise.
            "auth.enabled=false".to_string(),
        ]
    }
}

/// A running fanfinity process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Server {
    /// Starts `fanfinity <command>` with the test's names and extra `--set` pairs. For
    /// `serve` and `ingest`, waits until `/readyz` answers 200.
    pub fn start(command: &str, names: &Names, brokers: &str, extra: &[&str]) -> Self {
        Self::start_with_config(command, names, brokers, None, extra)
    }

    /// As [`Server::start`], reading `config` (a TOML file) under the `--set` pairs.
    pub fn start_with_config(
        command: &str,
        names: &Names,
        brokers: &str,
        config: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let mut args = vec![command.to_string(), "--shards".into(), "2".into()];
        if let Some(config) = config {
            args.push("--config".into());
            args.push(config.display().to_string());
        }
        let mut sets = names.settings(brokers);
        sets.push(format!("http.listen=\"127.0.0.1:{port}\""));
        sets.extend(extra.iter().map(|s| s.to_string()));
        for set in sets {
            args.push("--set".into());
            args.push(set);
        }
        let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
        std::fs::create_dir_all(&log_dir).expect("create target/test-logs");
        let log = log_dir.join(format!("{}-{command}-{port}.log", names.database));
        let mut server = Self {
            child: None,
            port,
            log,
            args,
        };
        server.spawn();
        if command != "consume" {
            server.wait_ready(Duration::from_secs(60));
        }
        server
    }

    /// Starts the process again with the same arguments (after [`Server::kill9`]).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        let child = Command::new(env!("CARGO_BIN_EXE_fanfinity"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fanfinity");
        self.child = Some(child);
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn wait_ready(&self, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(resp) = try_request(&self.addr(), "GET", "/readyz", &[], b"") {
                if resp.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "fanfinity not ready within {limit:?}; log: {}",
            self.log.display()
        );
    }

    /// SIGKILL, no chance to flush or commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait up to `limit` for a clean exit; returns the exit status code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn post(&self, content_type: &str, body: &[u8]) -> Response {
        request(
            &self.addr(),
            "POST",
            "/v1/events",
            &[("Content-Type", content_type)],
            body,
        )
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr(), "GET", path, &[], b"")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|err| panic!("{method} {path} on {addr} failed: {err}"))
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to EOF.
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::other(format!("bad response: {what}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Decodes a chunked body (ClickHouse streams its answers this way).
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Runs SQL on ClickHouse over HTTP and returns the text answer.
pub fn clickhouse(sql: &str) -> String {
    let url = clickhouse_url();
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let resp = request(addr, "POST", "/", &[], sql.as_bytes());
    assert_eq!(
        resp.status,
        200,
        "clickhouse refused {sql}: {}",
        resp.text()
    );
    resp.text()
}

/// Polls `probe` until it returns `Some`, or panics after `limit` with `what`.
pub fn eventually<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if started.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Distinct event ids ClickHouse holds for a match (none while the table does not exist
/// yet: the sink creates it when it starts).
pub fn stored_ids(database: &str, match_id: &str) -> Vec<String> {
    let url = clickhouse_url();
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let sql = format!(
        "SELECT DISTINCT toString(event_id) FROM {database}.events WHERE match_id = '{match_id}' FORMAT TabSeparated"
    );
    let resp = request(addr, "POST", "/", &[], sql.as_bytes());
    if resp.status != 200 {
        assert!(
            resp.text().contains("doesn't exist"),
            "clickhouse refused {sql}: {}",
            resp.text()
        );
        return Vec::new();
    }
    let text = resp.text();
    let mut ids: Vec<String> = text.lines().map(str::to_string).collect();
    ids.sort();
    ids
}

/// Waits up to `limit` until ClickHouse holds at least `expected` distinct ids of the
/// match, and returns them sorted.
pub fn wait_for_ids(
    names: &Names,
    match_id: &str,
    expected: usize,
    limit: Duration,
) -> Vec<String> {
    eventually(
        limit,
        &format!("{expected} events of {match_id} in ClickHouse"),
        || {
            let ids = stored_ids(&names.database, match_id);
            (ids.len() >= expected).then_some(ids)
        },
    )
}

/// A fresh random UUID v4, formatted, for client-chosen event ids.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One event as JSON with a client-chosen id.
pub fn event(id: &str, match_id: &str, user: &str, kind: &str) -> serde_json::Value {
    serde_json::json!({"event_id": id, "match_id": match_id, "user_id": user, "type": kind})
}

/// The raw table and every aggregate the migrations feed from it (with the ledger), for
/// `OPTIMIZE TABLE ... FINAL` in tests that compare answers before and after merges.
pub const STORED_TABLES: [&str; 9] = [
    "events",
    "event_ledger",
    "event_counts",
    "fan_buckets",
    "reaction_counts",
    "poll_votes",
    "fan_counts",
    "fan_totals",
    "match_minutes",
];

/// Drops the test's database.
pub fn drop_database(names: &Names) {
    let _ = try_request(
        clickhouse_url()
            .trim_start_matches("http://")
            .trim_end_matches('/'),
        "POST",
        "/",
        &[],
        format!("DROP DATABASE IF EXISTS {}", names.database).as_bytes(),
    );
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl TopicRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes raw records straight to a topic, as another producer would, and waits for
/// their acknowledgement.
pub fn produce_raw(brokers: &str, topic: &str, records: &[(&str, &[u8])]) {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("create test producer");
    for (key, payload) in records {
        producer
            .send(BaseRecord::to(topic).key(*key).payload(*payload))
            .map_err(|(err, _)| err)
            .expect("enqueue test record");
    }
    producer
        .flush(Duration::from_secs(10))
        .expect("flush test records");
}

/// Reads a topic from the beginning (all partitions, no group) until `want` records have
/// arrived or `limit` passes, and returns what was read.
pub fn read_topic(brokers: &str, topic: &str, want: usize, limit: Duration) -> Vec<TopicRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", new_id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("create test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < want && started.elapsed() < limit {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let headers = msg
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_string(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(TopicRecord {
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// A Tansu broker private to one test, which the test may kill and start again: the
/// memory build (`make stack-up`), or the durable sqlite build
/// (`scripts/stack.sh install-durable`, override with `TEST_TANSU_DURABLE_BIN`) whose
/// data lives in a temporary directory removed on drop.
pub struct PrivateBroker {
    child: Option<Child>,
    pub port: u16,
    /// `Some` for the durable build: its working directory.
    data_dir: Option<PathBuf>,
}

impl PrivateBroker {
    /// The memory broker on `port`.
    pub fn memory(port: u16) -> Self {
        let mut broker = Self {
            child: None,
            port,
            data_dir: None,
        };
        broker.start();
        broker
    }

    /// The durable broker on `port`, storing in a fresh temporary directory.
    pub fn durable(port: u16, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fanfinity-durable-{tag}"));
        let mut broker = Self {
            child: None,
            port,
            data_dir: Some(dir),
        };
        broker.start();
        broker
    }

    /// Starts (or restarts) the broker and waits until its port accepts connections.
    pub fn start(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = match &self.data_dir {
            None => {
                let mut command = Command::new(tansu_bin());
                command.arg("broker");
                command
            }
            Some(dir) => {
                std::fs::create_dir_all(dir).expect("broker data dir");
                let bin = std::env::var("TEST_TANSU_DURABLE_BIN")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                            .join("target/stack/bin/tansu-durable")
                    });
                let mut command = Command::new(bin);
                // Without --storage-engine it would silently run from memory; the two
                // variables would make it export telemetry or use a schema registry.
                command
                    .arg("broker")
                    .current_dir(dir)
                    .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .env_remove("SCHEMA_REGISTRY")
                    .env("NO_COLOR", "1")
                    .args(["--storage-engine", "sqlite://tansu.db"]);
                command
            }
        };
        // The broker's own log, kept beside the servers' for a failed run.
        let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
        std::fs::create_dir_all(&log_dir).expect("create target/test-logs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("tansu-{}.log", self.port)))
            .expect("open broker log");
        let child = command
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu (run `make stack-up` / `scripts/stack.sh install-durable`)");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(20), "private broker to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// SIGKILL: nothing is flushed.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill9();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `--set` value for `auth.keys`: the entries as an inline TOML array.
pub fn keys_setting(entries: &[fanfinity::auth::KeyEntry]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|e| {
            let roles: Vec<String> = e.roles.iter().map(|r| format!("\"{r}\"")).collect();
            format!(
                "{{id=\"{}\",name=\"{}\",roles=[{}],hash=\"{}\"}}",
                e.id,
                e.name,
                roles.join(","),
                e.hash
            )
        })
        .collect();
    format!("auth.keys=[{}]", items.join(","))
}
