//! Simulated fans and the events they send, shaped by the API contract.
//!
//! A batch's events are spread over the match time the batch covers, so the server's
//! timeline (bucketed by `ts`) reproduces the rate curve. Who sends what depends on the
//! moment: after a goal the scoring side's fans celebrate and cheer; in quiet play and at
//! half time they browse, chat, react and vote.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::match_file::MomentKind;
use crate::schedule::{Phase, PlannedBatch, RateCurve};

/// Share of a goal's celebrations that come from the scoring side's fans; the rest are
/// neutrals and rivals reacting anyway.
const SCORING_SIDE_SHARE: f64 = 0.85;

/// Whether `id` is a valid match id: 1-64 characters of `[A-Za-z0-9_.:-]`.
///
/// The charset also makes the id safe inside a SQL string literal and a URL path, which
/// `verify.rs` relies on.
pub fn valid_match_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// The event types of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Reaction,
    Cheer,
    GoalCelebration,
    PollVote,
    Chat,
    Share,
    View,
}

/// One event as `POST /v1/events` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event_id: Uuid,
    pub match_id: String,
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Event time (simulated match time) in epoch milliseconds.
    pub ts: i64,
    pub team: String,
    pub payload: Value,
}

// Weights (out of 100) of the event types, by situation.
const MIX_OPEN_PLAY: &[(EventType, u32)] = &[
    (EventType::View, 30),
    (EventType::Reaction, 25),
    (EventType::Chat, 15),
    (EventType::Cheer, 15),
    (EventType::PollVote, 8),
    (EventType::Share, 5),
    (EventType::GoalCelebration, 2),
];
const MIX_BREAK: &[(EventType, u32)] = &[
    (EventType::View, 35),
    (EventType::Chat, 25),
    (EventType::PollVote, 20),
    (EventType::Reaction, 10),
    (EventType::Share, 8),
    (EventType::Cheer, 2),
];
const MIX_AFTER_GOAL: &[(EventType, u32)] = &[
    (EventType::GoalCelebration, 50),
    (EventType::Cheer, 30),
    (EventType::Reaction, 10),
    (EventType::Share, 5),
    (EventType::Chat, 5),
];
const MIX_TENSE: &[(EventType, u32)] = &[
    (EventType::Cheer, 45),
    (EventType::Reaction, 35),
    (EventType::Chat, 15),
    (EventType::Share, 5),
];
const MIX_MINOR: &[(EventType, u32)] = &[
    (EventType::Reaction, 40),
    (EventType::Chat, 30),
    (EventType::Cheer, 20),
    (EventType::View, 10),
];

/// The event-type mix of the reaction to a moment.
fn reaction_mix(kind: MomentKind) -> &'static [(EventType, u32)] {
    match kind {
        MomentKind::Goal | MomentKind::ShootoutGoal | MomentKind::FinalWhistle => MIX_AFTER_GOAL,
        MomentKind::PenaltyAwarded | MomentKind::BigSave | MomentKind::ShootoutMiss => MIX_TENSE,
        MomentKind::Substitution | MomentKind::Other => MIX_MINOR,
    }
}

fn pick<T: Copy>(rng: &mut SmallRng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|&(_, w)| w).sum();
    let mut roll = rng.random_range(0..total.max(1));
    for &(item, weight) in table {
        if roll < weight {
            return item;
        }
        roll -= weight;
    }
    table[table.len() - 1].0
}

/// Emojis of the `reaction` type.
const EMOJIS: &[&str] = &["🔥", "😱", "👏", "😭", "🐐", "⚽", "🙌", "💙", "🤯"];

fn pick_str(rng: &mut SmallRng, options: &[&'static str]) -> &'static str {
    options[rng.random_range(0..options.len())]
}

/// The simulated crowd: fans `fan-0 .. fan-<n-1>`, even numbers for the home side and odd
/// numbers for the away side, so a fan's team never changes during a run.
#[derive(Debug, Clone)]
pub struct Crowd {
    fans: u32,
    home: String,
    away: String,
}

impl Crowd {
    /// A crowd of `fans` (at least one) split between `home` and `away`.
    pub fn new(fans: u32, home: &str, away: &str) -> Crowd {
        Crowd {
            fans: fans.max(1),
            home: home.to_string(),
            away: away.to_string(),
        }
    }

    /// The user id and team of fan `n`.
    pub fn fan(&self, n: u32) -> (String, &str) {
        let team = if n.is_multiple_of(2) {
            &self.home
        } else {
            &self.away
        };
        (format!("fan-{n}"), team)
    }

    /// A random fan, from `side`'s supporters when given (0 home, 1 away) and it has any.
    fn pick(&self, rng: &mut SmallRng, side: Option<u32>) -> u32 {
        if let Some(side) = side {
            let on_side = (self.fans + 1 - side) / 2;
            if on_side > 0 {
                return rng.random_range(0..on_side) * 2 + side;
            }
        }
        rng.random_range(0..self.fans)
    }

    fn side_of(&self, team: Option<&str>) -> Option<u32> {
        match team {
            Some(t) if t == self.home => Some(0),
            Some(t) if t == self.away => Some(1),
            _ => None,
        }
    }
}

/// Makes the events of planned batches.
pub struct EventFactory {
    match_id: String,
    kickoff_ms: i64,
    crowd: Crowd,
    rng: SmallRng,
}

impl EventFactory {
    /// A factory for `match_id` whose match minute 0 is `kickoff_ms`; `seed` fixes who sends
    /// what (event ids stay unique: they are UUID v7).
    pub fn new(match_id: &str, kickoff_ms: i64, crowd: Crowd, seed: u64) -> EventFactory {
        EventFactory {
            match_id: match_id.to_string(),
            kickoff_ms,
            crowd,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The `size` events of one planned batch.
    pub fn batch(&mut self, planned: &PlannedBatch, curve: &RateCurve, size: usize) -> Vec<Event> {
        let spike = planned.point.spike.map(|(i, _)| &curve.spikes()[i]);
        let share = planned.point.spike_share();
        let span = (planned.minute_to - planned.minute_from).max(0.0);

        let mut events = Vec::with_capacity(size);
        for _ in 0..size {
            let minute = planned.minute_from + self.rng.random::<f64>() * span;
            let reacting_to = spike.filter(|_| self.rng.random::<f64>() < share);

            let (kind, fan) = match reacting_to {
                Some(s) => {
                    let kind = pick(&mut self.rng, reaction_mix(s.kind));
                    let scoring = self.crowd.side_of(s.team.as_deref());
                    let side = scoring.filter(|_| self.rng.random::<f64>() < SCORING_SIDE_SHARE);
                    (kind, self.crowd.pick(&mut self.rng, side))
                }
                None => {
                    let mix = match planned.point.phase {
                        Phase::Play => MIX_OPEN_PLAY,
                        Phase::Break => MIX_BREAK,
                    };
                    (
                        pick(&mut self.rng, mix),
                        self.crowd.pick(&mut self.rng, None),
                    )
                }
            };

            let (user_id, team) = self.crowd.fan(fan);
            let moment_team = reacting_to.and_then(|s| s.team.as_deref());
            let payload = payload(&mut self.rng, kind, minute, moment_team.unwrap_or(team));
            events.push(Event {
                event_id: Uuid::now_v7(),
                match_id: self.match_id.clone(),
                user_id,
                kind,
                ts: self.kickoff_ms + (minute * 60_000.0) as i64,
                team: team.to_string(),
                payload,
            });
        }
        events
    }
}

/// A small, plausible payload for each type (well under `MAX_PAYLOAD_BYTES`).
fn payload(rng: &mut SmallRng, kind: EventType, minute: f64, for_team: &str) -> Value {
    match kind {
        EventType::Reaction => json!({
            "emoji": pick_str(rng, EMOJIS),
        }),
        EventType::Cheer => json!({ "intensity": rng.random_range(1..=5) }),
        EventType::GoalCelebration => json!({
            "minute": minute.floor() as u32,
            "for": for_team,
        }),
        EventType::PollVote => {
            if rng.random_bool(0.5) {
                let option = pick_str(rng, &["home", "away", "draw"]);
                json!({ "poll_id": "who-wins", "option": option })
            } else {
                let option = pick_str(rng, &["1", "2", "3", "4", "5"]);
                json!({ "poll_id": "rate-the-game", "option": option })
            }
        }
        EventType::Chat => json!({
            "text": pick_str(rng, &[
                "what a game", "VAMOS", "allez les bleus", "unbelievable",
                "ref!!", "no way", "GOAT", "can't watch", "here we go",
            ]),
            "lang": pick_str(rng, &["en", "es", "fr"]),
        }),
        EventType::Share => json!({
            "channel": pick_str(rng, &["whatsapp", "x", "instagram", "copy_link"]),
        }),
        EventType::View => json!({
            "screen": pick_str(rng, &["live", "stats", "lineups", "timeline"]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::match_file::MatchFile;
    use crate::schedule::Pacer;
    use std::collections::{HashMap, HashSet};

    const KICKOFF_MS: i64 = 1_700_000_000_000;

    /// The API's limits and type names, as the contract states them.
    const MAX_PAYLOAD_BYTES: usize = 4096;
    const MAX_USER_ID_LEN: usize = 128;
    const TYPES: [&str; 7] = [
        "reaction",
        "cheer",
        "goal_celebration",
        "poll_vote",
        "chat",
        "share",
        "view",
    ];

    fn fixture() -> (MatchFile, RateCurve) {
        let file = MatchFile::parse(
            r#"{"match_id": "m", "home": "ARG", "away": "FRA",
                "periods": [
                    {"name": "first_half", "start_minute": 0, "end_minute": 20},
                    {"name": "half_time", "start_minute": 20, "end_minute": 25},
                    {"name": "second_half", "start_minute": 25, "end_minute": 45}
                ],
                "moments": [
                    {"minute": 8, "kind": "goal", "team": "FRA"},
                    {"minute": 30, "kind": "big_save", "team": "ARG"}
                ]}"#,
        )
        .expect("valid fixture");
        let curve = RateCurve::new(&file, 400.0);
        (file, curve)
    }

    fn all_events(match_id: &str, fans: u32) -> Vec<Event> {
        let (file, curve) = fixture();
        let crowd = Crowd::new(fans, &file.home, &file.away);
        let mut factory = EventFactory::new(match_id, KICKOFF_MS, crowd, 7);
        Pacer::new(&curve, 600.0, 25)
            .flat_map(|b| factory.batch(&b, &curve, 25))
            .collect()
    }

    #[test]
    fn every_event_follows_the_api_rules() {
        let events = all_events("wc2022-final-arg-fra-r1700000000", 500);
        let end_ms = KICKOFF_MS + 46 * 60_000;
        let mut ids = HashSet::new();

        for e in &events {
            assert!(ids.insert(e.event_id), "duplicate id {}", e.event_id);
            assert_eq!(e.event_id.get_version_num(), 7);
            assert!(valid_match_id(&e.match_id));
            assert!(!e.user_id.is_empty() && e.user_id.len() <= MAX_USER_ID_LEN);
            let n: u32 = e.user_id["fan-".len()..].parse().expect("fan-<n>");
            assert!(n < 500);
            assert!((KICKOFF_MS..end_ms).contains(&e.ts), "ts {}", e.ts);
            assert!(e.payload.is_object());
            let payload = serde_json::to_vec(&e.payload).expect("payload serializes");
            assert!(payload.len() <= MAX_PAYLOAD_BYTES);

            let wire = serde_json::to_value(e).expect("event serializes");
            assert!(wire["ts"].is_i64());
            let t = wire["type"].as_str().expect("type is a string");
            assert!(TYPES.contains(&t), "type {t}");
            match e.kind {
                EventType::Reaction => assert!(e.payload["emoji"].is_string()),
                EventType::PollVote => {
                    assert!(e.payload["poll_id"].is_string());
                    assert!(e.payload["option"].is_string());
                }
                _ => {}
            }
        }
        assert!(events.len() > 1000);
    }

    #[test]
    fn fans_keep_their_team() {
        let events = all_events("m", 100);
        for e in &events {
            let n: u32 = e.user_id["fan-".len()..].parse().expect("fan-<n>");
            let expected = if n.is_multiple_of(2) { "ARG" } else { "FRA" };
            assert_eq!(e.team, expected, "{}", e.user_id);
        }
    }

    #[test]
    fn goal_minute_is_mostly_scoring_side_celebrating() {
        let events = all_events("m", 1000);
        let goal_minute = |e: &&Event| (e.ts - KICKOFF_MS) / 60_000 == 8;
        let at_goal: Vec<&Event> = events.iter().filter(goal_minute).collect();

        let mut by_type: HashMap<EventType, usize> = HashMap::new();
        for e in &at_goal {
            *by_type.entry(e.kind).or_default() += 1;
        }
        let loud = by_type
            .get(&EventType::GoalCelebration)
            .copied()
            .unwrap_or(0)
            + by_type.get(&EventType::Cheer).copied().unwrap_or(0);
        assert!(loud * 10 >= at_goal.len() * 7, "{by_type:?}");

        let celebrations: Vec<&&Event> = at_goal
            .iter()
            .filter(|e| e.kind == EventType::GoalCelebration)
            .collect();
        let from_france = celebrations.iter().filter(|e| e.team == "FRA").count();
        assert!(from_france * 10 >= celebrations.len() * 8);
    }

    #[test]
    fn half_time_has_no_goal_celebrations() {
        let events = all_events("m", 100);
        let in_break = events
            .iter()
            .filter(|e| (20..25).contains(&((e.ts - KICKOFF_MS) / 60_000)));
        let mut count = 0;
        for e in in_break {
            assert_ne!(e.kind, EventType::GoalCelebration);
            count += 1;
        }
        assert!(count > 0);
    }

    #[test]
    fn match_id_charset_and_length() {
        assert!(valid_match_id("wc2022-final-arg-fra-r1733000000"));
        assert!(valid_match_id("a.b:c_d-e"));
        assert!(valid_match_id(&"x".repeat(64)));
        assert!(!valid_match_id(&"x".repeat(65)));
        assert!(!valid_match_id(""));
        assert!(!valid_match_id("it's"));
        assert!(!valid_match_id("a b"));
        assert!(!valid_match_id("a/b"));
    }
}
