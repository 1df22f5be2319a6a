//! The thread-per-core HTTP ingest server.
//!
//! One glommio executor per shard, each with its own SO_REUSEPORT listener on the same
//! address; the kernel spreads connections across them. A shard parses, validates and
//! produces its own requests; the only things it shares with other shards are the Kafka
//! producer (thread-safe) and the query runtime. It does not consume from Kafka.

mod admin;
mod balance;
pub mod body;
mod connection;
mod connection_io;
pub mod cors;
pub mod decode;
pub mod error;
pub mod handler;
pub mod http_io;
pub mod inflight;
mod listener;
pub mod rate_limit;
pub mod request_body;
pub mod server;
pub mod state;
pub mod validate;
