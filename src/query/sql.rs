//! Pieces every analytics query shares: the window filter, error mapping and the
//! by-type maps answers carry.

use std::collections::BTreeMap;

use clickhouse::query::Query;
use clickhouse::Row;
use serde::Deserialize;

use super::window::Window;
use super::QueryError;
use crate::event::EventType;

/// The filter on a per-match aggregate over a window; `{col}` is its time column. Bind
/// with [`in_window`].
pub fn window_filter(col: &str) -> String {
    format!("match_id = ? AND {col} >= toDateTime(?) AND {col} < toDateTime(?)")
}

/// Binds the three values of [`window_filter`].
pub fn in_window(query: Query, match_id: &str, window: Window) -> Query {
    query.bind(match_id).bind(window.from).bind(window.to)
}

/// Maps a `clickhouse` crate error to the API's.
pub fn failed(err: clickhouse::error::Error) -> QueryError {
    QueryError::ClickHouse {
        detail: err.to_string(),
    }
}

/// Every event type at zero, so clients need no defaults.
pub fn zero_by_type() -> BTreeMap<&'static str, u64> {
    EventType::ALL.iter().map(|t| (t.as_str(), 0)).collect()
}

/// Adds `n` to `name`'s slot; names ClickHouse returns that this build does not know
/// are left out rather than invented.
pub fn add_type(map: &mut BTreeMap<&'static str, u64>, name: &str, n: u64) {
    if let Some(slot) = EventType::parse(name).and_then(|t| map.get_mut(t.as_str())) {
        *slot += n;
    }
}

/// The newest `received_at` (ms) in a window, from `event_counts`.
#[derive(Debug, Row, Deserialize)]
pub struct NewestRow {
    pub newest_ms: i64,
    pub events: u64,
}

/// SQL for [`NewestRow`] over [`window_filter`]`("second")`.
pub fn newest_sql() -> String {
    format!(
        "SELECT maxMerge(newest_ms) AS newest_ms, countMerge(events) AS events \
         FROM event_counts WHERE {}",
        window_filter("second")
    )
}

impl NewestRow {
    /// `None` when the window holds no events.
    pub fn newest(&self) -> Option<i64> {
        (self.events > 0).then_some(self.newest_ms)
    }
}
