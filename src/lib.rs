//! Fanfinity: thread-per-core ingest of live fan-engagement events.
//!
//! The data path is HTTP -> Kafka -> ClickHouse:
//! - [`ingest`] runs one glommio executor per core, each with its own SO_REUSEPORT
//!   listener; a request is answered 202 only after Kafka acknowledged every event in it.
//! - [`kafka`] owns the shared producer, the sink's consumers and topic administration.
//! - [`sink`] turns consumed records into ClickHouse rows and inserts them in batches.
//! - [`query`] answers per-match questions from ClickHouse.
//! - [`metrics`] keeps per-shard counters and latency histograms for Prometheus.
//! - [`auth`] checks API keys.
//! - [`app`] reads the configuration, wires the parts together and shuts them down.

pub mod app;
pub mod auth;
pub mod event;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod query;
pub mod sink;
