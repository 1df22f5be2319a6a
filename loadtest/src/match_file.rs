//! The match file: a real match's periods and key moments, by match minute.
//!
//! This module only reads and checks the file. What a moment does to the event rate lives
//! in `schedule.rs`; what fans send lives in `events.rs`.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::events::valid_match_id;

/// A match as the replay needs it.
#[derive(Debug, Clone, Deserialize)]
pub struct MatchFile {
    /// The match id of the real match; the replay appends a run suffix to it.
    pub match_id: String,
    #[serde(default)]
    pub title: String,
    /// Team code of the home side (the `team` of half the simulated fans).
    pub home: String,
    /// Team code of the away side.
    pub away: String,
    /// Periods of play and breaks, by match minute. Minutes outside every period, such as
    /// the pause before extra time, count as breaks.
    pub periods: Vec<Period>,
    /// Key moments in match-minute order.
    pub moments: Vec<Moment>,
}

/// One period of the match, `[start_minute, end_minute)`.
#[derive(Debug, Clone, Deserialize)]
pub struct Period {
    pub name: String,
    pub start_minute: f64,
    pub end_minute: f64,
}

/// A key moment: something the crowd reacts to.
#[derive(Debug, Clone, Deserialize)]
pub struct Moment {
    /// Match minute of the moment; stoppage time is counted on (90+7' is 97).
    pub minute: u32,
    pub kind: MomentKind,
    /// The team the moment is for (the scorer's side for a goal).
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub clock: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub score: Option<String>,
}

/// What happened at a moment. Unknown kinds are kept as `Other` so a richer file still loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentKind {
    Goal,
    PenaltyAwarded,
    BigSave,
    ShootoutGoal,
    ShootoutMiss,
    Substitution,
    FinalWhistle,
    #[serde(other)]
    Other,
}

impl MomentKind {
    /// The name used in the match file and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MomentKind::Goal => "goal",
            MomentKind::PenaltyAwarded => "penalty_awarded",
            MomentKind::BigSave => "big_save",
            MomentKind::ShootoutGoal => "shootout_goal",
            MomentKind::ShootoutMiss => "shootout_miss",
            MomentKind::Substitution => "substitution",
            MomentKind::FinalWhistle => "final_whistle",
            MomentKind::Other => "other",
        }
    }

    /// Whether the moment is a goal, whose minute the verification expects to be a peak.
    pub fn is_goal(self) -> bool {
        matches!(self, MomentKind::Goal | MomentKind::ShootoutGoal)
    }
}

impl MatchFile {
    /// Reads and checks a match file.
    ///
    /// # Errors
    /// When the file cannot be read, is not valid JSON of this shape, or fails `check`.
    pub fn load(path: &Path) -> Result<MatchFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading match file {}", path.display()))?;
        let file =
            MatchFile::parse(&text).with_context(|| format!("in match file {}", path.display()))?;
        Ok(file)
    }

    /// Parses and checks a match file's text.
    ///
    /// # Errors
    /// When the text is not a valid match file.
    pub fn parse(text: &str) -> Result<MatchFile> {
        let mut file: MatchFile = serde_json::from_str(text).context("parsing match JSON")?;
        file.check()?;
        file.moments.sort_by_key(|m| m.minute);
        Ok(file)
    }

    /// The last minute the replay covers: the end of the last period, or one minute past the
    /// last moment when a moment (the final whistle) sits at or after it, so its reaction
    /// is still replayed.
    pub fn end_minute(&self) -> f64 {
        let periods_end = self
            .periods
            .iter()
            .map(|p| p.end_minute)
            .fold(0.0, f64::max);
        let moments_end = self
            .moments
            .iter()
            .map(|m| f64::from(m.minute) + 1.0)
            .fold(0.0, f64::max);
        periods_end.max(moments_end)
    }

    /// The period a match minute falls in, if any.
    pub fn period_at(&self, minute: f64) -> Option<&Period> {
        self.periods
            .iter()
            .find(|p| minute >= p.start_minute && minute < p.end_minute)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            valid_match_id(&self.match_id),
            "match_id {:?} is not 1-64 characters of [A-Za-z0-9_.:-]",
            self.match_id
        );
        ensure!(
            !self.home.is_empty() && !self.away.is_empty(),
            "home and away must be set"
        );
        ensure!(!self.periods.is_empty(), "the match has no periods");
        for p in &self.periods {
            if !(p.start_minute >= 0.0 && p.end_minute > p.start_minute) {
                bail!(
                    "period {:?} runs from minute {} to {}",
                    p.name,
                    p.start_minute,
                    p.end_minute
                );
            }
        }
        // A cap on the length keeps a typo (minute 9000) from making a replay of days.
        ensure!(
            self.end_minute() <= 300.0,
            "the match lasts {} minutes; at most 300 are supported",
            self.end_minute()
        );
        Ok(())
    }
}

impl Period {
    /// Whether play stops in this period (half time, a break before extra time): the crowd
    /// is quieter then.
    pub fn is_break(&self) -> bool {
        let name = self.name.to_ascii_lowercase();
        ["half_time", "halftime", "break", "interval"]
            .iter()
            .any(|word| name.contains(word))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"{
        "match_id": "mini", "home": "ARG", "away": "FRA",
        "periods": [
            {"name": "first_half", "start_minute": 0, "end_minute": 45},
            {"name": "half_time", "start_minute": 45, "end_minute": 60},
            {"name": "second_half", "start_minute": 60, "end_minute": 105}
        ],
        "moments": [
            {"minute": 80, "kind": "goal", "team": "FRA"},
            {"minute": 23, "kind": "goal", "team": "ARG", "score": "1-0"},
            {"minute": 30, "kind": "corner_kick", "team": "ARG"},
            {"minute": 105, "kind": "final_whistle"}
        ]
    }"#;

    #[test]
    fn parses_moments_in_minute_order_and_keeps_unknown_kinds() {
        let file = MatchFile::parse(MINI).expect("valid file");
        let minutes: Vec<u32> = file.moments.iter().map(|m| m.minute).collect();
        assert_eq!(minutes, vec![23, 30, 80, 105]);
        assert_eq!(file.moments[1].kind, MomentKind::Other);
        assert!(file.moments[0].kind.is_goal());
    }

    #[test]
    fn end_minute_covers_a_moment_at_the_final_whistle() {
        let file = MatchFile::parse(MINI).expect("valid file");
        assert_eq!(file.end_minute(), 106.0);
    }

    #[test]
    fn half_time_is_a_break_and_gaps_have_no_period() {
        let file = MatchFile::parse(MINI).expect("valid file");
        assert!(file.period_at(50.0).expect("half time").is_break());
        assert!(!file.period_at(10.0).expect("first half").is_break());
        assert!(file.period_at(105.5).is_none());
    }

    #[test]
    fn rejects_a_match_id_outside_the_charset() {
        let text = MINI.replace("\"mini\"", "\"mini final\"");
        let err = MatchFile::parse(&text).expect_err("space is not allowed");
        assert!(format!("{err:#}").contains("match_id"));
    }

    #[test]
    fn reads_the_shared_world_cup_final_shape() {
        // The same shape as loadtest/matches/wc2022-final.json, cut down.
        let text = r#"{
          "match_id": "wc2022-final-arg-fra", "title": "final",
          "kickoff_utc": "2022-12-18T15:00:00Z",
          "home": "ARG", "away": "FRA", "note": "n",
          "periods": [{"name": "first_half", "start_minute": 0, "end_minute": 52}],
          "moments": [{"clock": "90+7'", "minute": 97, "kind": "big_save", "team": "ARG"}]
        }"#;
        let file = MatchFile::parse(text).expect("valid file");
        assert_eq!(file.moments[0].kind, MomentKind::BigSave);
        assert_eq!(file.end_minute(), 98.0);
    }
}
