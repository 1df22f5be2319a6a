//! Request bodies for the open-model profiles, written byte by byte from a template.
//!
//! At 100k events/s on a shared 2-core machine, building a `serde_json::Value` per event
//! would cost the generator more CPU than the server it measures. Instead the fixed parts
//! of an event are escaped once, and each event is a few `extend_from_slice` calls plus
//! a fresh UUIDv7, the time, and a counter-driven user, type and team.
//!
//! Every event id is unique (`Uuid::now_v7`); every event of a run has the same match id.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

/// The event types of the API, taken in turn.
const TYPES: &[&str] = &[
    "view",
    "reaction",
    "chat",
    "cheer",
    "poll_vote",
    "share",
    "goal_celebration",
];

/// Distinct user ids a run cycles through.
const FANS: u64 = 100_003;

/// An event with no padding serializes to about this many bytes; `--event-bytes` below
/// it sends no padding.
pub const UNPADDED_EVENT_BYTES: usize = 170;

/// Default `--event-bytes`: about what `loadtest replay` sends per event.
pub const DEFAULT_EVENT_BYTES: usize = 200;

/// How a request body frames its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// One JSON object for one event, a JSON array for several.
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl BodyFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Json => "application/json",
            BodyFormat::Ndjson => "application/x-ndjson",
        }
    }
}

/// The fixed parts of an event and the counters that vary the rest.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    /// `{"event_id":"`
    /// then the id, then `after_id` = `","match_id":"<id>","user_id":"fan-`
    after_id: Vec<u8>,
    /// `","type":"`
    /// ... and `tail` = `,"payload":{"pad":"<padding>"}}`
    tail: Vec<u8>,
    teams: [Vec<u8>; 2],
    format: BodyFormat,
    batch: usize,
    counter: u64,
}

/// One built body and, when asked for, its ids.
#[derive(Debug)]
pub struct Body {
    pub bytes: Bytes,
    pub ids: Option<Vec<Uuid>>,
}

/// `s` as the inside of a JSON string (the match id and teams are plain ASCII already;
/// this keeps a surprising `--match-id` from breaking the JSON).
fn json_inner(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    quoted[1..quoted.len() - 1].to_string()
}

impl BodyTemplate {
    /// A template for `match_id`, padded so an event is about `event_bytes` long.
    pub fn new(
        match_id: &str,
        format: BodyFormat,
        batch: usize,
        event_bytes: usize,
    ) -> BodyTemplate {
        let after_id = format!(
            "\",\"match_id\":\"{}\",\"user_id\":\"fan-",
            json_inner(match_id)
        );
        let padding = event_bytes.saturating_sub(UNPADDED_EVENT_BYTES);
        let tail = format!(",\"payload\":{{\"pad\":\"{}\"}}}}", "x".repeat(padding));
        let teams = [
            format!("\",\"team\":\"{}\"", "HOME").into_bytes(),
            format!("\",\"team\":\"{}\"", "AWAY").into_bytes(),
        ];
        BodyTemplate {
            after_id: after_id.into_bytes(),
            tail: tail.into_bytes(),
            teams,
            format,
            batch: batch.max(1),
            counter: 0,
        }
    }

    /// Events per body.
    pub fn batch(&self) -> usize {
        self.batch
    }

    fn write_event(&mut self, out: &mut Vec<u8>, id: Uuid, ts_ms: u64) {
        let n = self.counter;
        self.counter = self.counter.wrapping_add(1);
        let mut id_text = [0u8; 36];
        out.extend_from_slice(b"{\"event_id\":\"");
        out.extend_from_slice(id.as_hyphenated().encode_lower(&mut id_text).as_bytes());
        out.extend_from_slice(&self.after_id);
        out.extend_from_slice((n % FANS).to_string().as_bytes());
        out.extend_from_slice(b"\",\"type\":\"");
        out.extend_from_slice(TYPES[(n % TYPES.len() as u64) as usize].as_bytes());
        out.extend_from_slice(&self.teams[(n % FANS % 2) as usize]);
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(ts_ms.to_string().as_bytes());
        out.extend_from_slice(&self.tail);
    }

    /// The next body: `batch` fresh events stamped now. Ids are returned only when
    /// `keep_ids` (the verification needs them; a plain run should not pay for them).
    pub fn next_body(&mut self, keep_ids: bool) -> Body {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let per_event = self.after_id.len() + self.tail.len() + 110;
        let mut out = Vec::with_capacity(per_event * self.batch + 2);
        let mut ids = keep_ids.then(|| Vec::with_capacity(self.batch));
        let array = self.format == BodyFormat::Json && self.batch > 1;

        if array {
            out.push(b'[');
        }
        for i in 0..self.batch {
            if i > 0 {
                out.push(if array { b',' } else { b'\n' });
            }
            let id = Uuid::now_v7();
            if let Some(ids) = ids.as_mut() {
                ids.push(id);
            }
            self.write_event(&mut out, id, ts_ms);
        }
        if array {
            out.push(b']');
        }
        Body {
            bytes: Bytes::from(out),
            ids,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn one_json_event_is_an_object_with_a_unique_v7_id() {
        let mut t = BodyTemplate::new("lt-steady-1", BodyFormat::Json, 1, DEFAULT_EVENT_BYTES);
        let a = t.next_body(true);
        let b = t.next_body(true);
        let value: Value = serde_json::from_slice(&a.bytes).expect("valid JSON");
        assert_eq!(value["match_id"], "lt-steady-1");
        assert!(value["ts"].is_i64() && value["payload"].is_object());
        let id = Uuid::parse_str(value["event_id"].as_str().expect("id")).expect("uuid");
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(a.ids.as_deref(), Some(&[id][..]));
        assert_ne!(a.ids, b.ids);
        let size = a.bytes.len();
        assert!(
            (DEFAULT_EVENT_BYTES - 20..DEFAULT_EVENT_BYTES + 20).contains(&size),
            "{size}"
        );
    }

    #[test]
    fn batches_are_arrays_or_lines() {
        let mut t = BodyTemplate::new("m", BodyFormat::Json, 3, 0);
        let body = t.next_body(false);
        assert!(body.ids.is_none());
        let value: Value = serde_json::from_slice(&body.bytes).expect("valid JSON");
        assert_eq!(value.as_array().map(Vec::len), Some(3));

        let mut t = BodyTemplate::new("m", BodyFormat::Ndjson, 3, 0);
        let body = t.next_body(true);
        let lines: Vec<Value> = body
            .bytes
            .split(|b| *b == b'\n')
            .map(|l| serde_json::from_slice(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 3);
        let types: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
        assert_eq!(types, ["view", "reaction", "chat"]);
    }

    #[test]
    fn pads_events_to_the_asked_size() {
        let mut t = BodyTemplate::new("lt-spike-1", BodyFormat::Json, 1, 1000);
        let size = t.next_body(false).bytes.len();
        assert!((980..1020).contains(&size), "{size}");
    }
}
