//! Everything that talks to Kafka: the shared producer, the sink's consumers and topic
//! administration. Topics: `fanfinity.events` (accepted events, keyed by match id),
//! `.retry` and `.dead` (see docs/architecture/SYSTEM_DESIGN.md).

pub mod consumer;
pub mod dead_letter;
pub mod dead_topic;
pub mod producer;
pub mod retry_consumer;
pub mod retry_letter;
pub mod topics;
