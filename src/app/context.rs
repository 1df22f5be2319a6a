//! The one dependency container: builds every part a subcommand needs, in order, and
//! tears them down in reverse (the order itself is documented in `shutdown.rs`).
//!
//! Start-up order: topics, producer (and a first broker probe), query runtime, ClickHouse
//! migrations and sink consumers, then the shards, so nothing accepts events before the
//! parts behind it exist. ClickHouse being down does not stop ingest from starting:
//! migrations and consumers start in the background once it answers, while Kafka holds
//! the events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{error, info, warn};

use super::config::Config;
use crate::auth::{AuthState, KeySet};
use crate::ingest::server::{shard_metrics, start_shards, ServerError, Shards};
use crate::ingest::state::IngestShared;
use crate::kafka::consumer::{spawn_consumers, ConsumeError, ConsumerHandle};
use crate::kafka::producer::{EventProducer, ProduceError};
use crate::kafka::topics::{TopicAdmin, TopicError};
use crate::query::cache::PublishedAnswers;
use crate::query::runtime::QueryRuntime;
use crate::sink::migrate;
use crate::sink::status::SinkStatus;

/// Which parts a subcommand runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// HTTP shards and the producer.
    pub ingest: bool,
    /// Consumer threads writing ClickHouse.
    pub sink: bool,
    /// The metrics query endpoint (served by the shards, so it needs `ingest`).
    pub query: bool,
}

impl Roles {
    pub const SERVE: Roles = Roles {
        ingest: true,
        sink: true,
        query: true,
    };
    pub const INGEST: Roles = Roles {
        ingest: true,
        sink: false,
        query: true,
    };
    pub const CONSUME: Roles = Roles {
        ingest: false,
        sink: true,
        query: false,
    };
}

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error(transparent)]
    Producer(#[from] ProduceError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Consumers(#[from] ConsumeError),
    #[error("cannot start the query runtime")]
    QueryRuntime(#[source] std::io::Error),
    #[error("cannot start the {name} thread")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Every running part of the process.
pub struct AppContext {
    config: Arc<Config>,
    producer: Option<Arc<EventProducer>>,
    query: Option<Arc<QueryRuntime>>,
    shards: Option<Shards>,
    sink_status: Arc<SinkStatus>,
    sink_starter: Option<JoinHandle<()>>,
    consumers: Arc<Mutex<Vec<ConsumerHandle>>>,
    /// Set first at shutdown: shards stop accepting and refuse new events.
    stopping: Arc<AtomicBool>,
    /// Set after the producer is flushed: consumers finish their batch and leave.
    consumers_stop: Arc<AtomicBool>,
    /// The API keys in force; [`AppContext::auth`] lets SIGHUP replace them.
    auth: Arc<AuthState>,
}

impl AppContext {
    /// Starts the parts `roles` asks for, in dependency order.
    ///
    /// # Errors
    /// The first part that cannot start; parts already started are stopped again when
    /// the partial context is dropped by the caller's exit.
    pub fn start(config: Config, roles: Roles) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let stopping = Arc::new(AtomicBool::new(false));
        let consumers_stop = Arc::new(AtomicBool::new(false));
        let sink_status = Arc::new(SinkStatus::default());
        // validate() already refused malformed entries, so this cannot fail here.
        let keys = KeySet::from_entries(&config.auth.keys).unwrap_or_default();
        let auth = Arc::new(AuthState::new(config.auth.enabled, keys));

        let topics = TopicAdmin::new(&config.kafka)?;
        let broker_answered = match topics.ensure() {
            Ok(states) => {
                info!(topics = states.len(), "kafka topics ready");
                true
            }
            Err(err) if roles.ingest => {
                // Ingest still starts: /readyz stays 503 until a broker answers.
                warn!(error = %err, "cannot ensure kafka topics; continuing, readiness will tell");
                false
            }
            Err(err) => return Err(err.into()),
        };

        let producer = if roles.ingest {
            let producer = Arc::new(EventProducer::new(&config.kafka)?);
            producer
                .spawn_watchdog()
                .map_err(|source| StartError::Thread {
                    name: "producer-watchdog",
                    source,
                })?;
            if broker_answered {
                match producer.probe(Duration::from_millis(config.kafka.admin_timeout_ms)) {
                    Ok(()) => info!(brokers = %config.kafka.brokers, "kafka reachable"),
                    Err(err) => warn!(brokers = %config.kafka.brokers, error = %err,
                        "kafka not reachable yet; answering 503 until it is"),
                }
            }
            Some(producer)
        } else {
            None
        };

        let query = if roles.query {
            Some(QueryRuntime::start(&config).map_err(StartError::QueryRuntime)?)
        } else {
            None
        };

        let consumers = Arc::new(Mutex::new(Vec::new()));
        let sink_starter = if roles.sink {
            Some(start_sink(
                Arc::clone(&config),
                Arc::clone(&sink_status),
                Arc::clone(&consumers),
                Arc::clone(&consumers_stop),
            )?)
        } else {
            None
        };

        let shards = match &producer {
            Some(producer) => {
                let shared = Arc::new(IngestShared {
                    config: Arc::clone(&config),
                    producer: Some(Arc::clone(producer)),
                    query: query.clone(),
                    shard_metrics: shard_metrics(config.shard_count()),
                    sink: roles.sink.then(|| Arc::clone(&sink_status)),
                    stopping: Arc::clone(&stopping),
                    auth: Arc::clone(&auth),
                    answers: PublishedAnswers::new(config.query.cache_entries),
                });
                Some(start_shards(shared)?)
            }
            None => None,
        };

        Ok(Self {
            config,
            producer,
            query,
            shards,
            sink_status,
            sink_starter,
            consumers,
            stopping,
            consumers_stop,
            auth,
        })
    }

    /// Starts only the shards, with no producer, query runtime or sink: the no-op
    /// benchmark server (`fanfinity noop-server`). Every connection, timeout, cap, auth
    /// and rate-limit rule of the real server applies; an event post is read and answered
    /// 202 without being decoded or sent to Kafka, so benches/compare can show what the
    /// HTTP layer alone costs. Nothing here touches Kafka or ClickHouse.
    ///
    /// # Errors
    /// A shard that cannot start or bind.
    pub fn start_noop(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let stopping = Arc::new(AtomicBool::new(false));
        // validate() already refused malformed entries, so this cannot fail here.
        let keys = KeySet::from_entries(&config.auth.keys).unwrap_or_default();
        let auth = Arc::new(AuthState::new(config.auth.enabled, keys));
        let shared = Arc::new(IngestShared {
            config: Arc::clone(&config),
            producer: None,
            query: None,
            shard_metrics: shard_metrics(config.shard_count()),
            sink: None,
            stopping: Arc::clone(&stopping),
            auth: Arc::clone(&auth),
            answers: PublishedAnswers::new(1),
        });
        let shards = start_shards(shared)?;
        Ok(Self {
            config,
            producer: None,
            query: None,
            shards: Some(shards),
            sink_status: Arc::new(SinkStatus::default()),
            sink_starter: None,
            consumers: Arc::new(Mutex::new(Vec::new())),
            stopping,
            consumers_stop: Arc::new(AtomicBool::new(false)),
            auth,
        })
    }

    /// The key set the shards check, for replacing it at run time.
    pub fn auth(&self) -> Arc<AuthState> {
        Arc::clone(&self.auth)
    }

    /// The sink's shared status (consumers running, ClickHouse state).
    pub fn sink_status(&self) -> Arc<SinkStatus> {
        Arc::clone(&self.sink_status)
    }

    /// Stops everything in reverse order of start. See `shutdown.rs` for the contract.
    pub fn shutdown(mut self) {
        info!("shutdown: stopping ingest");
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(shards) = self.shards.take() {
            shards.join();
        }
        info!("shutdown: shards stopped");

        if let Some(producer) = self.producer.take() {
            let queued = producer.queue_depth();
            let timeout = Duration::from_millis(self.config.kafka.flush_timeout_ms);
            match producer.flush(timeout) {
                Ok(()) => info!(queued, "shutdown: producer flushed"),
                Err(err) => error!(queued, still_queued = producer.queue_depth(), error = %err,
                    "shutdown: producer flush timed out; unacknowledged records may be lost \
                     (their requests were not answered 202)"),
            }
        }

        self.consumers_stop.store(true, Ordering::Relaxed);
        if let Some(starter) = self.sink_starter.take() {
            let _ = starter.join();
        }
        let consumers = self
            .consumers
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        let count = consumers.len();
        for consumer in consumers {
            consumer.join();
        }
        info!(
            consumers = count,
            rows_inserted = self.sink_status.rows_inserted.load(Ordering::Relaxed),
            "shutdown: consumers stopped"
        );

        drop(self.query.take());
        info!("shutdown: complete");
    }
}

/// Runs migrations (retrying while ClickHouse is unreachable) and then starts the
/// consumers, on a thread of its own so ingest never waits for ClickHouse.
fn start_sink(
    config: Arc<Config>,
    status: Arc<SinkStatus>,
    consumers: Arc<Mutex<Vec<ConsumerHandle>>>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name("sink-start".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    error!(error = %err, "cannot start a runtime for migrations; sink not started");
                    return;
                }
            };
            let mut wait = Duration::from_millis(500);
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match runtime.block_on(migrate::run(&config.clickhouse)) {
                    Ok(report) => {
                        info!(applied = ?report.applied, "clickhouse schema ready");
                        break;
                    }
                    Err(err) => {
                        status.insert_failed(&err.to_string(), false);
                        warn!(error = %err, retry_in_ms = wait.as_millis() as u64,
                            "clickhouse migrations failed; sink waits, kafka keeps the events");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            }
            let drain = Duration::from_millis(config.sink.shutdown_drain_ms);
            match spawn_consumers(&config, Arc::clone(&status), Arc::clone(&stop), drain) {
                Ok(handles) => {
                    info!(consumers = handles.len(), group = %config.consumer.group_id,
                        topic = %config.kafka.topic, "sink consumers started");
                    if let Ok(mut slot) = consumers.lock() {
                        slot.extend(handles);
                    }
                }
                Err(err) => error!(error = %err, "sink consumers failed to start"),
            }
        })
        .map_err(|source| StartError::Thread {
            name: "sink-start",
            source,
        })
}
