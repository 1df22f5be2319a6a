//! Typed configuration, merged in a fixed order and validated once at boot.
//!
//! Sources, later ones winning: built-in defaults, a TOML file (`--config`), environment
//! variables `FANFINITY_SECTION__KEY` (double underscore between section and key), then
//! command-line flags (`--set section.key=value` and the named shortcuts). The defaults
//! work with the local stack (`make stack-up`) without any file.
//!
//! This module does not open sockets or talk to any service; it only describes them.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every setting fanfinity reads. One struct, so that a whole run is described in one place
/// and printed (redacted) at start-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub kafka: KafkaConfig,
    pub consumer: ConsumerConfig,
    pub sink: SinkConfig,
    pub clickhouse: ClickHouseConfig,
    pub query: QueryConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
}

/// The ingest HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address every shard binds (SO_REUSEPORT spreads connections across them).
    pub listen: SocketAddr,
    /// Number of shards (executors). 0 means one per core the process may run on (its
    /// affinity mask).
    pub shards: usize,
    /// First CPU to pin shard 0 to; shard `i` goes to `(first_core + i) % N`, N being the
    /// CPUs online (see [`online_cpus`]).
    pub first_core: usize,
    /// Largest request body read, in bytes. Bigger bodies get 413 without being read
    /// when they announce their length.
    pub max_body_bytes: usize,
    /// Most events in one request; a goal spike is absorbed by more requests, not
    /// unbounded ones.
    pub max_events_per_request: usize,
    /// Longest a request body may take to arrive, from the first read to its last byte.
    /// Past it: 408 `request_timeout` and the connection is closed, so a client that
    /// stops mid-body gives back its in-flight slot. 10 s carries a full `max_body_bytes`
    /// body at 100 KB/s; event bodies are a few KB.
    pub body_read_timeout_ms: u64,
    /// Event requests one shard works on at once; past it, 503 `overloaded` at once.
    pub max_inflight_requests: usize,
    /// Body bytes one shard's in-progress event requests may hold (declared length, or
    /// `max_body_bytes` when unknown); past it, 503 `overloaded` at once.
    pub max_inflight_bytes: usize,
    /// Longest a request waits for Kafka's delivery reports before answering 503. Kept
    /// above `kafka.message_timeout_ms` so the usual answer is the definitive one.
    pub ack_timeout_ms: u64,
    /// Seconds sent in `Retry-After` with a 503.
    pub retry_after_secs: u32,
    /// At shutdown, how long shards wait for open requests to finish.
    pub shutdown_grace_ms: u64,
    /// Accept backlog per shard listener (capped by `net.core.somaxconn`): a goal brings
    /// reconnect storms.
    pub listen_backlog: i32,
    /// Locked memory glommio reserves per executor for registered I/O buffers. Ingest
    /// does no file I/O, so this stays small; see `tuning/README.md`.
    pub io_memory_bytes: usize,
    /// Entries in each of the three io_uring rings glommio gives a shard (main, latency
    /// and poll; `LocalExecutorBuilder::ring_depth`): how many operations a shard hands the
    /// kernel in one submission (more wait in glommio's queue for the next one). It is
    /// also how many I/O completions may pile up before a busy shard stops running tasks
    /// to collect them. The kernel rounds it up to a power of two and refuses more than
    /// 32768. 128 is glommio 0.9's default.
    pub ring_depth: usize,
    /// Longest a saturated shard runs tasks before it collects completed I/O again (new
    /// connections, arrived bytes, finished writes), in ms (`LocalExecutorBuilder::
    /// preempt_timer`). A shard whose tasks run out collects I/O at once, so this only
    /// matters under load. 100 is glommio 0.9's default.
    pub preempt_timer_ms: u64,
    /// Origins whose browser pages may post events (CORS), as `scheme://host[:port]`.
    /// Empty: no CORS headers at all. `["*"]`: any origin; fanfinity never sends
    /// `Access-Control-Allow-Credentials`, so keys travel in headers set by the page, not
    /// in cookies.
    pub cors_allowed_origins: Vec<String>,
    /// `Access-Control-Max-Age` of a preflight answer: how long a browser may reuse it.
    /// Browsers cap it (Chromium at 7200 s).
    pub cors_max_age_secs: u64,
    /// How long a client has to send a whole request head (request line and headers),
    /// counted from the connection's accept or from the first byte after an idle
    /// keep-alive pause. Past it: 408 with a JSON body, then close. Bounds what a
    /// slowloris client can hold; see docs/connections.md.
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may sit idle between requests before it is
    /// closed without an answer. Kept above the 60 s idle timeout common load balancers
    /// use, so a balancer always closes first and never sends into a socket we closed.
    pub idle_timeout_ms: u64,
    /// Open connections one shard serves at once; a connection past it is answered 503
    /// `too_many_connections` with `Retry-After` and closed, without touching the others.
    pub max_connections_per_shard: usize,
    /// Hand a newly accepted connection to the least-loaded shard when its own shard
    /// serves at least two more (`ingest/balance.rs`): SO_REUSEPORT's hash leaves the
    /// few long-lived connections of a load balancer unevenly spread.
    pub balance_connections: bool,
    /// A second address serving only `/metrics`, `/healthz` and `/readyz` (shard 0 binds
    /// it); when set, the public listener answers 404 for those. Unset: they are public,
    /// as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: 0,
            first_core: 0,
            max_body_bytes: 1024 * 1024,
            max_events_per_request: 1000,
            body_read_timeout_ms: 10_000,
            max_inflight_requests: 4096,
            max_inflight_bytes: 256 * 1024 * 1024,
            ack_timeout_ms: 5_000,
            retry_after_secs: 1,
            shutdown_grace_ms: 10_000,
            listen_backlog: 4096,
            io_memory_bytes: 512 * 1024,
            ring_depth: 128,
            preempt_timer_ms: 100,
            cors_allowed_origins: Vec::new(),
            cors_max_age_secs: 600,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 75_000,
            max_connections_per_shard: 10_000,
            balance_connections: true,
            admin_listen: None,
        }
    }
}

/// Kafka connection, topics and the shared producer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`bootstrap.servers`).
    pub brokers: String,
    pub client_id: String,
    /// Accepted events, keyed by match id.
    pub topic: String,
    /// Events whose insert failed for their content, awaiting another attempt.
    pub retry_topic: String,
    /// Events that cannot be stored, with the reason.
    pub dead_topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// `retention.ms` of the created topics (default 48 h).
    pub retention_ms: i64,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// `batch.size` in bytes.
    pub batch_size_bytes: u32,
    /// `compression.type`: none, gzip, snappy, lz4 or zstd.
    pub compression: String,
    /// `message.timeout.ms`: a record not acknowledged by then fails (and its request
    /// gets 503). Bounds how long a client can wait on a dead broker.
    pub message_timeout_ms: u32,
    /// `queue.buffering.max.messages`: records in the producer queue before enqueue fails.
    pub queue_max_messages: u32,
    /// `queue.buffering.max.kbytes`.
    pub queue_max_kbytes: u32,
    /// At shutdown, how long to wait for queued records to be delivered.
    pub flush_timeout_ms: u64,
    /// Topic creation and metadata requests. Short, so a node whose broker is down still
    /// starts listening (and answers 503) quickly.
    pub admin_timeout_ms: u64,
    /// Fraction of `queue_max_messages` above which new requests get 503 and `/readyz`
    /// fails, so a load balancer drains the node before the queue overflows.
    pub queue_ready_fraction: f64,
    /// Largest Kafka record one event may become (key, value and librdkafka's per-record
    /// overhead). An event past it gets 413 `event_too_large` at ingest instead of being
    /// accepted and then failed by the producer. The default and the ceiling are
    /// librdkafka's `message.max.bytes` default, which the producer leaves in force.
    pub max_message_bytes: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            client_id: "fanfinity".into(),
            topic: "fanfinity.events".into(),
            retry_topic: "fanfinity.events.retry".into(),
            dead_topic: "fanfinity.events.dead".into(),
            partitions: 3,
            replication_factor: 1,
            retention_ms: 48 * 3600 * 1000,
            linger_ms: 5,
            batch_size_bytes: 1024 * 1024,
            compression: "lz4".into(),
            message_timeout_ms: 3_000,
            queue_max_messages: 500_000,
            queue_max_kbytes: 512 * 1024,
            flush_timeout_ms: 10_000,
            admin_timeout_ms: 5_000,
            queue_ready_fraction: 0.8,
            max_message_bytes: 1_000_000,
        }
    }
}

/// The sink's Kafka consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    pub group_id: String,
    /// Consumer threads in this process; each is one group member.
    pub threads: usize,
    /// CPUs to pin consumer threads to, round robin. Empty: the last online cores, shared
    /// with shards on small machines.
    pub cores: Vec<usize>,
    /// `auto.offset.reset` for a group with no committed offset.
    pub auto_offset_reset: String,
    /// `session.timeout.ms`.
    pub session_timeout_ms: u32,
    /// `max.poll.interval.ms`: the sink polls while it retries, so this is never reached
    /// by a slow ClickHouse.
    pub max_poll_interval_ms: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group_id: "fanfinity-sink".into(),
            threads: 1,
            cores: Vec::new(),
            auto_offset_reset: "earliest".into(),
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 300_000,
        }
    }
}

/// Largest `sink.dedup_window`: the window is held in memory by every consumer thread and
/// warmed from ClickHouse per partition, so a typo with extra zeros must not start.
pub const MAX_DEDUP_WINDOW: usize = 50_000_000;

/// Batching of ClickHouse inserts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Rows that trigger a flush. See docs/architecture/SYSTEM_DESIGN.md for the
    /// measurement behind the default.
    pub max_batch_rows: usize,
    /// Age of the oldest buffered row that triggers a flush: the floor of the
    /// "202 to queryable" latency.
    pub flush_interval_ms: u64,
    /// First retry delay after a failed insert; doubles up to `retry_max_ms`, with jitter.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// At shutdown, how long a consumer keeps retrying its last batch before leaving it
    /// uncommitted (it is consumed again on the next start).
    pub shutdown_drain_ms: u64,
    /// Further attempts a row ClickHouse refused for its content gets, from the retry
    /// topic, before it goes to the dead topic. 0 sends refused rows straight there.
    pub retry_topic_attempts: u32,
    /// Wait before the first of those attempts; doubles per attempt up to
    /// `retry_topic_delay_max_ms`. Long on purpose: content refusals that heal do so
    /// because someone changed the table, not within milliseconds.
    pub retry_topic_delay_ms: u64,
    pub retry_topic_delay_max_ms: u64,
    /// `(match_id, event_id)` pairs each consumer thread remembers after inserting them,
    /// so a client's resend of an event (same id, new Kafka offset) is dropped instead of
    /// counted twice by the aggregates. About 27 bytes per entry (13.5 MB per thread at
    /// the default); 0 turns the window off (the ledger check still runs). See
    /// `sink::dedup`.
    pub dedup_window: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 50_000,
            flush_interval_ms: 500,
            retry_min_ms: 200,
            retry_max_ms: 10_000,
            shutdown_drain_ms: 10_000,
            retry_topic_attempts: 3,
            retry_topic_delay_ms: 30_000,
            retry_topic_delay_max_ms: 300_000,
            dedup_window: 500_000,
        }
    }
}

/// How ClickHouse inserts are compressed on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WireCompression {
    /// Required for ClickHouse 18.16, which answers `compress=1` queries with an empty body.
    None,
    Lz4,
}

/// ClickHouse connection.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface URL.
    pub url: String,
    pub database: String,
    pub user: String,
    /// Never printed; see the redacted `Display` of [`Config`].
    pub password: String,
    pub compression: WireCompression,
    /// Row validation sends `RowBinaryWithNamesAndTypes`, which 18.16 does not know.
    pub validation: bool,
    /// Per-request timeout for inserts and queries.
    pub request_timeout_ms: u64,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:18123".into(),
            database: "fanfinity".into(),
            user: "default".into(),
            password: String::new(),
            compression: WireCompression::None,
            validation: false,
            request_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("compression", &self.compression)
            .field("validation", &self.validation)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

/// The analytics API (docs/analytics.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Tokio worker threads that run ClickHouse queries for all shards.
    pub threads: usize,
    /// Refuse windows that would produce more timeline buckets than this.
    pub max_buckets: u64,
    /// How long a shard serves an answer without recomputing it. 0 turns the cache off.
    pub cache_ttl_ms: u64,
    /// How old an answer may be served while one recomputation runs (at least the TTL);
    /// older ones make the request wait for the recomputation.
    pub cache_max_stale_ms: u64,
    /// Answers each shard keeps at most.
    pub cache_entries: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            threads: 2,
            max_buckets: 10_000,
            cache_ttl_ms: 500,
            cache_max_stale_ms: 5_000,
            cache_entries: 512,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `fanfinity=debug`. `RUST_LOG` wins.
    pub level: String,
    /// `text` for people, `json` for log shippers.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// API keys (see `crate::auth`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Check keys. `serve` and `ingest` refuse to start with this on and no key that may
    /// ingest; turning it off is for development only and logged at warn.
    pub enabled: bool,
    /// Salted hashes of the keys in force, made by `fanfinity keys new`. Re-read on
    /// SIGHUP (with the rest of the file; only the keys take effect without a restart).
    pub keys: Vec<crate::auth::KeyEntry>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keys: Vec::new(),
        }
    }
}

/// Rate limits, enforced by each shard on its own (see `src/ingest/rate_limit.rs` and
/// `docs/rate-limits.md`). A rate of 0 turns its limit off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Events per second one API key may post to one shard. An app key carries every
    /// fan of that app, so this is a ceiling against a leaked key or a runaway client,
    /// not a per-fan allowance; the default is about half of what one shard produces.
    pub per_key_events_per_sec: u32,
    /// Events a key may post at once above its rate (a goal). At least
    /// `http.max_events_per_request`, so every valid request can pass.
    pub per_key_burst: u32,
    /// API requests per second from one client address to one shard. Generous: a
    /// carrier-grade NAT puts hundreds or thousands of fans behind one IPv4 address.
    pub per_ip_requests_per_sec: u32,
    /// Requests one address may send at once above its rate.
    pub per_ip_burst: u32,
    /// Most buckets a shard tracks per limit; past it the fullest are forgotten (those
    /// clients start again with a full burst). About 100 bytes each.
    pub max_buckets_per_shard: usize,
    /// Count clients by the last `X-Forwarded-For` address instead of the TCP peer. Only
    /// behind a proxy that sets it: otherwise any client can claim any address.
    pub trust_forwarded_for: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_key_events_per_sec: 50_000,
            per_key_burst: 100_000,
            per_ip_requests_per_sec: 1_000,
            per_ip_burst: 2_000,
            max_buckets_per_shard: 100_000,
            trust_forwarded_for: false,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration")]
    Load(#[source] Box<figment::Error>),
    #[error("invalid --set argument {arg:?}: expected section.key=value")]
    BadOverride { arg: String },
    #[error("invalid configuration: {field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Values given on the command line, applied last.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `section.key=value` pairs. Values are read as TOML scalars when they parse as
    /// such (numbers, booleans, arrays) and as strings otherwise.
    pub pairs: Vec<String>,
}

impl Config {
    /// Merges defaults, the optional TOML file, `FANFINITY_*` variables and overrides,
    /// then validates the result.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, an unknown key, a value of the wrong type,
    /// or a value [`Config::validate`] refuses.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(file, true, overrides)
    }

    /// [`Config::load`], optionally without reading the environment (for tests, which must
    /// not depend on what a developer exported).
    fn load_from(
        file: Option<&Path>,
        read_env: bool,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        if read_env {
            figment = figment.merge(Env::prefixed("FANFINITY_").split("__"));
        }
        for pair in &overrides.pairs {
            let (key, raw) = pair
                .split_once('=')
                .filter(|(k, _)| k.contains('.'))
                .ok_or_else(|| ConfigError::BadOverride { arg: pair.clone() })?;
            figment = figment.merge(Serialized::default(key.trim(), parse_scalar(raw)));
        }
        let config: Config = figment
            .extract()
            .map_err(|err| ConfigError::Load(Box::new(err)))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings that would start a broken service: blank topics, zero sizes,
    /// a readiness fraction outside (0, 1].
    ///
    /// # Errors
    /// The first offending field, with the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "must not be blank");
        }
        for (field, topic) in [
            ("kafka.topic", &k.topic),
            ("kafka.retry_topic", &k.retry_topic),
            ("kafka.dead_topic", &k.dead_topic),
        ] {
            if !is_valid_topic_name(topic) {
                return invalid(field, "must be 1-249 chars of [A-Za-z0-9._-]");
            }
        }
        if k.topic == k.retry_topic || k.topic == k.dead_topic || k.retry_topic == k.dead_topic {
            return invalid("kafka.topic", "events, retry and dead topics must differ");
        }
        if k.partitions < 1 {
            return invalid("kafka.partitions", "must be at least 1");
        }
        if k.replication_factor < 1 {
            return invalid("kafka.replication_factor", "must be at least 1");
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
            return invalid(
                "kafka.compression",
                "must be none, gzip, snappy, lz4 or zstd",
            );
        }
        if k.message_timeout_ms == 0 || k.queue_max_messages == 0 {
            return invalid(
                "kafka.message_timeout_ms",
                "and queue_max_messages must be > 0",
            );
        }
        if !(k.queue_ready_fraction > 0.0 && k.queue_ready_fraction <= 1.0) {
            return invalid("kafka.queue_ready_fraction", "must be in (0, 1]");
        }
        if self.http.max_body_bytes == 0 || self.http.max_events_per_request == 0 {
            return invalid(
                "http.max_body_bytes",
                "and max_events_per_request must be > 0",
            );
        }
        if !(1024..=1_000_000).contains(&k.max_message_bytes) {
            return invalid(
                "kafka.max_message_bytes",
                "must be 1024-1000000 (the producer keeps librdkafka's message.max.bytes \
                 of 1000000)",
            );
        }
        if self.http.body_read_timeout_ms == 0 {
            return invalid("http.body_read_timeout_ms", "must be > 0");
        }
        if self.http.ack_timeout_ms <= u64::from(k.message_timeout_ms) {
            return invalid(
                "http.ack_timeout_ms",
                "must exceed kafka.message_timeout_ms, so a 503 is only given once the \
                 delivery outcome is known or overdue",
            );
        }
        if self.sink.max_batch_rows == 0 || self.sink.flush_interval_ms == 0 {
            return invalid("sink.max_batch_rows", "and flush_interval_ms must be > 0");
        }
        if self.sink.retry_min_ms == 0 || self.sink.retry_max_ms < self.sink.retry_min_ms {
            return invalid("sink.retry_min_ms", "must be > 0 and <= retry_max_ms");
        }
        if self.sink.retry_topic_delay_max_ms < self.sink.retry_topic_delay_ms {
            return invalid(
                "sink.retry_topic_delay_ms",
                "must be <= retry_topic_delay_max_ms",
            );
        }
        if self.sink.retry_topic_attempts > 100 {
            return invalid("sink.retry_topic_attempts", "must be at most 100");
        }
        if self.sink.dedup_window > MAX_DEDUP_WINDOW {
            return invalid(
                "sink.dedup_window",
                "must be at most 50,000,000 (about 1.3 GB per consumer thread)",
            );
        }
        if self.consumer.group_id.trim().is_empty() {
            return invalid("consumer.group_id", "must not be blank");
        }
        if !["earliest", "latest", "error"].contains(&self.consumer.auto_offset_reset.as_str()) {
            return invalid(
                "consumer.auto_offset_reset",
                "must be earliest, latest or error",
            );
        }
        if self.consumer.threads == 0 {
            return invalid("consumer.threads", "must be at least 1");
        }
        let cores = online_cpus();
        if let Some(core) = self.consumer.cores.iter().find(|c| **c >= cores) {
            return invalid(
                "consumer.cores",
                &format!(
                    "names core {core}, but this machine has {cores} (0-{})",
                    cores - 1
                ),
            );
        }
        if self.http.shards > cores {
            return invalid(
                "http.shards",
                &format!(
                    "is {}, more than the {cores} online cores (one shard per core)",
                    self.http.shards
                ),
            );
        }
        if self.http.max_inflight_requests == 0
            || self.http.max_inflight_bytes < self.http.max_body_bytes
        {
            return invalid(
                "http.max_inflight_requests",
                "must be > 0, and max_inflight_bytes at least max_body_bytes",
            );
        }
        if self.http.listen_backlog < 1 {
            return invalid("http.listen_backlog", "must be at least 1");
        }
        if self.http.io_memory_bytes < 64 * 1024 {
            return invalid("http.io_memory_bytes", "must be at least 65536");
        }
        // glommio panics on a depth of 0; io_uring_setup refuses more than 32768 entries.
        if !(1..=MAX_RING_DEPTH).contains(&self.http.ring_depth) {
            return invalid(
                "http.ring_depth",
                "must be 1-32768 (the kernel's io_uring limit)",
            );
        }
        if !(1..=MAX_PREEMPT_TIMER_MS).contains(&self.http.preempt_timer_ms) {
            return invalid("http.preempt_timer_ms", "must be 1-1000");
        }
        if self.http.retry_after_secs == 0 {
            return invalid("http.retry_after_secs", "must be at least 1");
        }
        if self.http.header_read_timeout_ms == 0 || self.http.idle_timeout_ms == 0 {
            return invalid(
                "http.header_read_timeout_ms",
                "and idle_timeout_ms must be > 0",
            );
        }
        if self.http.max_connections_per_shard == 0 {
            return invalid("http.max_connections_per_shard", "must be at least 1");
        }
        if self.http.admin_listen == Some(self.http.listen) {
            return invalid("http.admin_listen", "must differ from http.listen");
        }
        let limits = &self.limits;
        if limits.per_key_events_per_sec > 0
            && (limits.per_key_burst as usize) < self.http.max_events_per_request
        {
            return invalid(
                "limits.per_key_burst",
                "must be at least http.max_events_per_request while the key limit is on",
            );
        }
        if limits.per_ip_requests_per_sec > 0 && limits.per_ip_burst == 0 {
            return invalid("limits.per_ip_burst", "must be at least 1");
        }
        if limits.max_buckets_per_shard < 16 {
            return invalid("limits.max_buckets_per_shard", "must be at least 16");
        }
        if let Err(reason) = crate::ingest::cors::check_origins(&self.http.cors_allowed_origins) {
            return invalid("http.cors_allowed_origins", &reason);
        }
        if self.clickhouse.request_timeout_ms == 0 {
            return invalid("clickhouse.request_timeout_ms", "must be > 0");
        }
        let url = &self.clickhouse.url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return invalid("clickhouse.url", "must be an http:// or https:// URL");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                "is not a valid tracing filter (e.g. info, fanfinity=debug)",
            );
        }
        if self.clickhouse.database.is_empty()
            || !self
                .clickhouse
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return invalid("clickhouse.database", "must be [A-Za-z0-9_]+");
        }
        if self.query.threads == 0 || self.query.max_buckets == 0 || self.query.cache_entries == 0 {
            return invalid("query.threads", "max_buckets and cache_entries must be > 0");
        }
        if self.query.cache_ttl_ms > 60_000 || self.query.cache_max_stale_ms > 600_000 {
            return invalid(
                "query.cache_ttl_ms",
                "must be at most 60000 (and cache_max_stale_ms at most 600000)",
            );
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return invalid("log.format", "must be text or json");
        }
        if let Err(err) = crate::auth::KeySet::from_entries(&self.auth.keys) {
            return Err(ConfigError::Invalid {
                field: "auth.keys",
                reason: err.to_string(),
            });
        }
        Ok(())
    }

    /// The configuration as TOML with secrets replaced, for the start-up log and
    /// `fanfinity config --check`.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.clickhouse.password.is_empty() {
            shown.clickhouse.password = "<redacted>".into();
        }
        shown.clickhouse.url = redact_userinfo(&shown.clickhouse.url);
        toml::to_string(&shown).unwrap_or_else(|err| format!("<unprintable: {err}>"))
    }

    /// Number of shards to start: the configured count, or one per core this process may
    /// run on (its affinity mask, so `taskset` or a container's cpuset shrink the default).
    pub fn shard_count(&self) -> usize {
        if self.http.shards > 0 {
            self.http.shards
        } else {
            schedulable_cores()
        }
    }
}

/// Most entries io_uring_setup accepts for one ring (the kernel's `IORING_MAX_ENTRIES`).
const MAX_RING_DEPTH: usize = 32_768;

/// Longest preempt timer accepted: past a second, one saturated shard would leave its
/// sockets unread for longer than any client waits politely.
const MAX_PREEMPT_TIMER_MS: u64 = 1_000;

/// Reads a command-line value as a TOML scalar where it is one, else as a string, so
/// `--set http.shards=2` is a number and `--set kafka.brokers=host:9092` a string.
fn parse_scalar(raw: &str) -> toml::Value {
    let raw = raw.trim();
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Cores this process may run on: its affinity mask, within any cgroup CPU quota.
fn schedulable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPUs the machine has online (the highest id in `/sys/devices/system/cpu/online`, plus
/// one): the numbers `http.first_core` and `consumer.cores` address, and the ones glommio
/// accepts for a pinned shard. Not the affinity mask: `isolcpus=` and systemd's
/// `CPUAffinity=` shrink the mask to the housekeeping cores, and counting it would refuse
/// shards on the cores set aside for them, or wrap them onto the housekeeping ones
/// (`tuning/README.md`). Falls back to the mask where sysfs cannot be read.
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| highest_cpu(&list))
        .map_or_else(schedulable_cores, |highest| highest + 1)
}

/// The highest CPU in a kernel CPU list such as `0-3,6,8-11`; `None` when it does not
/// parse.
fn highest_cpu(list: &str) -> Option<usize> {
    let mut highest = None;
    for range in list.trim().split(',') {
        let last: usize = range.rsplit('-').next()?.parse().ok()?;
        highest = highest.max(Some(last));
    }
    highest
}

/// Hides a password written into a URL (`http://user:secret@host` -> `http://user:<redacted>@host`).
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!(
                "{scheme}://{user}:<redacted>@{host}{}",
                &rest[authority_end..]
            )
        }
        None => url.to_string(),
    }
}

/// Kafka's own rule for topic names.
fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(pairs: &[&str]) -> Overrides {
        Overrides {
            pairs: pairs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn defaults_are_valid_and_match_the_local_stack() {
        let config = Config::load_from(None, false, &Overrides::default()).expect("defaults load");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.kafka.brokers, "127.0.0.1:19092");
        assert_eq!(config.clickhouse.url, "http://127.0.0.1:18123");
        assert_eq!(config.kafka.partitions, 3);
    }

    #[test]
    fn set_overrides_nested_keys_with_typed_values() {
        let config = Config::load_from(
            None,
            false,
            &overrides(&[
                "http.shards=1",
                "kafka.brokers=10.0.0.1:9092",
                "clickhouse.validation=true",
            ]),
        )
        .expect("overrides apply");
        assert_eq!(config.http.shards, 1);
        assert_eq!(config.kafka.brokers, "10.0.0.1:9092");
        assert!(config.clickhouse.validation);
    }

    #[test]
    fn refuses_blank_topic() {
        let err = Config::load_from(None, false, &overrides(&["kafka.topic="])).unwrap_err();
        assert!(err.to_string().contains("kafka.topic"), "{err}");
    }

    #[test]
    fn refuses_zero_batch_rows() {
        let err =
            Config::load_from(None, false, &overrides(&["sink.max_batch_rows=0"])).unwrap_err();
        assert!(err.to_string().contains("sink.max_batch_rows"), "{err}");
    }

    #[test]
    fn dedup_window_may_be_off_but_not_huge() {
        let off = Config::load_from(None, false, &overrides(&["sink.dedup_window=0"]))
            .expect("0 turns the window off");
        assert_eq!(off.sink.dedup_window, 0);
        let err = Config::load_from(None, false, &overrides(&["sink.dedup_window=500000000"]))
            .unwrap_err();
        assert!(err.to_string().contains("sink.dedup_window"), "{err}");
    }

    #[test]
    fn refuses_settings_that_would_break_the_service() {
        for bad in [
            "consumer.auto_offset_reset=middle",
            "consumer.threads=0",
            "consumer.cores=[0,9999]",
            "clickhouse.url=ftp://x",
            "log.level=fanfinity=bogus[",
            "http.shards=100000",
            "http.io_memory_bytes=1",
            "http.retry_after_secs=0",
            "clickhouse.request_timeout_ms=0",
            "http.body_read_timeout_ms=0",
            "http.header_read_timeout_ms=0",
            "http.idle_timeout_ms=0",
            "http.max_connections_per_shard=0",
            "http.admin_listen=\"127.0.0.1:8080\"",
            "kafka.max_message_bytes=100",
            "kafka.max_message_bytes=2000000",
        ] {
            assert!(
                Config::load_from(None, false, &overrides(&[bad])).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn glommio_defaults_are_glommio_0_9_defaults() {
        let http = HttpConfig::default();
        assert_eq!(http.ring_depth, 128);
        assert_eq!(http.preempt_timer_ms, 100);
    }

    #[test]
    fn refuses_ring_depth_and_preempt_timer_glommio_or_the_kernel_would_refuse() {
        for bad in [
            "http.ring_depth=0",
            "http.ring_depth=32769",
            "http.preempt_timer_ms=0",
            "http.preempt_timer_ms=1001",
        ] {
            let err = Config::load_from(None, false, &overrides(&[bad])).unwrap_err();
            let field = bad.split_once('=').map_or(bad, |(field, _)| field);
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
        let edges = overrides(&["http.ring_depth=32768", "http.preempt_timer_ms=1"]);
        let config = Config::load_from(None, false, &edges).expect("edges are valid");
        assert_eq!(config.http.ring_depth, 32_768);
        assert_eq!(config.http.preempt_timer_ms, 1);
        let low = overrides(&["http.ring_depth=1", "http.preempt_timer_ms=1000"]);
        assert!(Config::load_from(None, false, &low).is_ok());
    }

    #[test]
    fn reads_the_highest_cpu_of_a_kernel_cpu_list() {
        assert_eq!(highest_cpu("0-1\n"), Some(1));
        assert_eq!(highest_cpu("0"), Some(0));
        assert_eq!(highest_cpu("0-3,6,8-11"), Some(11));
        assert_eq!(highest_cpu("8-11,0-3"), Some(11));
        assert_eq!(highest_cpu(""), None);
        assert_eq!(highest_cpu("0-x"), None);
    }

    #[test]
    fn redacts_passwords_inside_urls() {
        assert_eq!(
            redact_userinfo("http://u:pw@h:1/x"),
            "http://u:<redacted>@h:1/x"
        );
        assert_eq!(redact_userinfo("http://h:1"), "http://h:1");
    }

    #[test]
    fn refuses_limits_and_origins_that_cannot_work() {
        for bad in [
            "limits.per_key_burst=10",
            "limits.max_buckets_per_shard=0",
            "http.cors_allowed_origins=[\"*\",\"https://a.example\"]",
            "http.cors_allowed_origins=[\"https://a.example/\"]",
            "http.cors_allowed_origins=[\"null\"]",
        ] {
            assert!(
                Config::load_from(None, false, &overrides(&[bad])).is_err(),
                "{bad} was accepted"
            );
        }
        let off = overrides(&["limits.per_key_events_per_sec=0", "limits.per_key_burst=0"]);
        assert!(Config::load_from(None, false, &off).is_ok());
    }

    #[test]
    fn refuses_unknown_key() {
        assert!(Config::load_from(None, false, &overrides(&["http.nonsense=1"])).is_err());
    }

    #[test]
    fn refuses_override_without_section() {
        assert!(matches!(
            Config::load_from(None, false, &overrides(&["shards=2"])),
            Err(ConfigError::BadOverride { .. })
        ));
    }

    #[test]
    fn redacts_the_clickhouse_password() {
        let mut config = Config::default();
        config.clickhouse.password = "hunter2".into();
        assert!(!config.redacted_toml().contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn reads_a_toml_file() {
        let dir = std::env::temp_dir().join(format!("fanfinity-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "[sink]\nmax_batch_rows = 7\n").expect("write");
        let config =
            Config::load_from(Some(&path), false, &Overrides::default()).expect("file loads");
        assert_eq!(config.sink.max_batch_rows, 7);
    }
}
