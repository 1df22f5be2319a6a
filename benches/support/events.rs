//! Realistic client events for the hot-path benches, from a fixed seed.
//!
//! Shaped like the load generator's (`loadtest/src/events.rs`): a UUID v7 `event_id`, one
//! of eight concurrent matches, `fan-<n>` users split between the two sides, the open-play
//! type mix, epoch-millisecond `ts` inside the match, the fan's team and a small
//! per-type payload. An event is about 190 bytes of JSON, a body of 100 about 19 KB.
//!
//! Shared with `#[path]` by `ingest_decode`, `kafka_record` and `clickhouse_encode`; each
//! uses a part of it, hence the `dead_code` allowance on the module's users.

use fanfinity::event::EventRecord;
use fanfinity::ingest::decode::{decode_events, BodyFormat};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::{Builder, Uuid};

/// The largest request the benches decode at once; the service's default limit is higher,
/// so no body here is refused for its size.
pub const MAX_EVENTS: usize = 1_000;

/// Server clock stamped on decoded events: 2026-06-28T18:00:00Z, during the matches.
pub const RECEIVED_AT_MS: i64 = 1_782_669_600_000;

/// Matches played at the same time, home and away side in the id's last two parts.
const MATCHES: [(&str, &str, &str); 8] = [
    ("wc2026-r16-1-arg-aus", "ARG", "AUS"),
    ("wc2026-r16-2-fra-pol", "FRA", "POL"),
    ("wc2026-r16-3-eng-sen", "ENG", "SEN"),
    ("wc2026-r16-4-bra-kor", "BRA", "KOR"),
    ("wc2026-r16-5-ned-usa", "NED", "USA"),
    ("wc2026-r16-6-jpn-cro", "JPN", "CRO"),
    ("wc2026-r16-7-mar-esp", "MAR", "ESP"),
    ("wc2026-r16-8-por-sui", "POR", "SUI"),
];

/// Open-play weights out of 100, as in the load generator.
const TYPE_MIX: [(&str, u32); 7] = [
    ("view", 30),
    ("reaction", 25),
    ("chat", 15),
    ("cheer", 15),
    ("poll_vote", 8),
    ("share", 5),
    ("goal_celebration", 2),
];

const FANS: u32 = 100_000;
const EMOJIS: [&str; 9] = ["🔥", "😱", "👏", "😭", "🐐", "⚽", "🙌", "💙", "🤯"];
const CHAT: [&str; 9] = [
    "what a game",
    "VAMOS",
    "allez les bleus",
    "unbelievable",
    "ref!!",
    "no way",
    "GOAT",
    "can't watch",
    "here we go",
];

/// One event as a client posts it to `POST /v1/events`.
#[derive(Debug, Clone, Serialize)]
pub struct WireEvent {
    pub event_id: Uuid,
    pub match_id: &'static str,
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ts: i64,
    pub team: &'static str,
    pub payload: Value,
}

/// `count` events from `seed`; the same seed always gives the same events.
pub fn wire_events(seed: u64, count: usize) -> Vec<WireEvent> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let kickoff_ms = RECEIVED_AT_MS - 45 * 60_000;
    (0..count)
        .map(|_| {
            let (match_id, home, away) = MATCHES[rng.usize(..MATCHES.len())];
            let fan = rng.u32(..FANS);
            let team = if fan % 2 == 0 { home } else { away };
            let kind = pick_type(&mut rng);
            let ts = kickoff_ms + rng.i64(0..45 * 60_000);
            let mut random = [0u8; 10];
            rng.fill(&mut random);
            WireEvent {
                event_id: Builder::from_unix_timestamp_millis(ts as u64, &random).into_uuid(),
                match_id,
                user_id: format!("fan-{fan}"),
                kind,
                ts,
                team,
                payload: payload(&mut rng, kind, ts - kickoff_ms, team),
            }
        })
        .collect()
}

fn pick_type(rng: &mut fastrand::Rng) -> &'static str {
    let mut roll = rng.u32(..100);
    for (kind, weight) in TYPE_MIX {
        if roll < weight {
            return kind;
        }
        roll -= weight;
    }
    TYPE_MIX[0].0
}

fn payload(rng: &mut fastrand::Rng, kind: &str, since_kickoff_ms: i64, team: &str) -> Value {
    let pick =
        |rng: &mut fastrand::Rng, options: &[&'static str]| options[rng.usize(..options.len())];
    match kind {
        "reaction" => json!({ "emoji": pick(rng, &EMOJIS) }),
        "cheer" => json!({ "intensity": rng.u8(1..=5) }),
        "goal_celebration" => json!({ "minute": since_kickoff_ms / 60_000, "for": team }),
        "poll_vote" => {
            json!({ "poll_id": "who-wins", "option": pick(rng, &["home", "away", "draw"]) })
        }
        "chat" => json!({ "text": pick(rng, &CHAT), "lang": pick(rng, &["en", "es", "fr"]) }),
        "share" => json!({ "channel": pick(rng, &["whatsapp", "x", "instagram", "copy_link"]) }),
        _ => json!({ "screen": pick(rng, &["live", "stats", "lineups", "timeline"]) }),
    }
}

/// How a request body frames its events.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// One JSON object.
    Single,
    /// A JSON array of objects.
    Array,
    /// One object per line.
    Ndjson,
}

impl Shape {
    /// The body format the handler would read from `Content-Type`.
    pub fn format(self) -> BodyFormat {
        match self {
            Shape::Single | Shape::Array => BodyFormat::Json,
            Shape::Ndjson => BodyFormat::Ndjson,
        }
    }
}

/// The request body holding `events` in `shape` (`Single` takes the first event only).
///
/// # Errors
/// Only if serde_json cannot serialize an event, which its field types rule out.
pub fn body(events: &[WireEvent], shape: Shape) -> serde_json::Result<Vec<u8>> {
    match shape {
        Shape::Single => serde_json::to_vec(&events.first()),
        Shape::Array => serde_json::to_vec(events),
        Shape::Ndjson => {
            let mut body = Vec::new();
            for event in events {
                serde_json::to_writer(&mut body, event)?;
                body.push(b'\n');
            }
            Ok(body)
        }
    }
}

/// `count` validated records, decoded from array bodies of at most 100 events by the
/// service's own decode path, as a shard would hand them on.
///
/// # Errors
/// A body the service refuses, which would mean the generator is wrong.
pub fn records(seed: u64, count: usize) -> anyhow::Result<Vec<EventRecord>> {
    let events = wire_events(seed, count);
    let mut records = Vec::with_capacity(count);
    for chunk in events.chunks(100) {
        let body = body(chunk, Shape::Array)?;
        records.extend(decode_events(
            &body,
            BodyFormat::Json,
            MAX_EVENTS,
            RECEIVED_AT_MS,
        )?);
    }
    Ok(records)
}
