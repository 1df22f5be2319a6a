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

/// A client-sent string read back from ClickHouse (an emoji, a poll option, a user id, a
/// team). Read as bytes and decoded lossily: a value that is not valid UTF-8 (a ClickHouse
/// function cutting a character in half, an old row) shows as U+FFFD in its own entry
/// instead of failing the whole answer with a 503.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(s.to_string())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lossy;
        impl serde::de::Visitor<'_> for Lossy {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Text, E> {
                Ok(Text(String::from_utf8_lossy(v).into_owned()))
            }
        }
        deserializer.deserialize_bytes(Lossy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{BorrowedBytesDeserializer, Error};

    #[test]
    fn broken_utf8_becomes_a_replacement_character() {
        let cut = b"a\xF0\x9F\x94";
        let text = Text::deserialize(BorrowedBytesDeserializer::<Error>::new(cut));
        assert_eq!(text.ok().map(|t| t.0), Some("a\u{FFFD}".to_string()));
    }
}
