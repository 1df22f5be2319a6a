//! Counters and latency histograms, kept where the work happens and rendered for
//! Prometheus on scrape.
//!
//! Each shard owns one [`shard::ShardMetrics`]; only its executor writes to it, so the
//! lock inside is uncontended except during a scrape. The sink keeps its own numbers in
//! `sink::status`. This module owns no HTTP routing: `/metrics` calls [`render`].

pub mod histogram;
pub mod prometheus;
pub mod shard;

pub use prometheus::render;
