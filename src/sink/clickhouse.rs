//! Builds `clickhouse` crate clients from configuration.
//!
//! ClickHouse 18.16 (Debian's package, used by the local stack) needs validation off and
//! no compression; current ClickHouse takes both on. Both are config switches so the same
//! binary serves either.

use clickhouse::{Client, Compression};

use crate::app::config::{ClickHouseConfig, WireCompression};

/// A client bound to the configured database.
pub fn client(config: &ClickHouseConfig) -> Client {
    server_client(config).with_database(&config.database)
}

/// A client with no default database, for creating it.
pub fn server_client(config: &ClickHouseConfig) -> Client {
    let compression = match config.compression {
        WireCompression::None => Compression::None,
        WireCompression::Lz4 => Compression::Lz4,
    };
    let mut client = Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_validation(config.validation)
        .with_compression(compression);
    if !config.password.is_empty() {
        client = client.with_password(&config.password);
    }
    client
}
