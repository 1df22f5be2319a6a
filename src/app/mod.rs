//! Process-level concerns: configuration, the dependency container, resource limits and
//! shutdown.

pub mod config;
pub mod context;
pub mod limits;
pub mod shutdown;
