//! The rate curve of a replay and the clock that turns it into batches.
//!
//! Everything here is a pure function of the match file and the flags, so the shape of a
//! run can be unit-tested without a server. Rates are in events per second of *real* time;
//! `speed` only squeezes match time (at speed 60 one match minute lasts one second).

use std::time::Duration;

use crate::match_file::{MatchFile, MomentKind};

/// Share of the base rate while play is stopped (half time, the pause before extra time):
/// fans still browse and chat, but far less than during play.
pub const BREAK_FACTOR: f64 = 0.35;

/// How long, in match minutes, a moment's reaction stays at its full peak.
pub const SPIKE_HOLD_MINUTES: f64 = 1.0;

/// Time constant, in match minutes, of the exponential decay after the peak: one minute
/// after the hold the extra traffic is down to 37 %, three minutes after to 5 %.
pub const DECAY_TAU_MINUTES: f64 = 1.0;

/// After this many match minutes of decay a moment adds nothing (under 0.3 % of its peak),
/// so a point of the curve only looks at nearby moments.
pub const DECAY_CUTOFF_MINUTES: f64 = 6.0;

/// Simulation step of the pacer, in seconds of real time. One millisecond is the tokio
/// timer's resolution, so a finer plan could not be kept anyway.
const PACER_STEP_S: f64 = 0.001;

/// Peak traffic of a moment, as a multiple of the base rate.
///
/// A goal in a final brings 30-50x the traffic of open play; a penalty or a big save about
/// ten times; a substitution barely registers.
pub fn peak_multiplier(kind: MomentKind) -> f64 {
    match kind {
        MomentKind::Goal => 40.0,
        MomentKind::ShootoutGoal => 35.0,
        MomentKind::FinalWhistle => 25.0,
        MomentKind::PenaltyAwarded | MomentKind::BigSave | MomentKind::ShootoutMiss => 10.0,
        MomentKind::Substitution => 2.0,
        MomentKind::Other => 3.0,
    }
}

/// Extra traffic of one moment `minutes_since` match minutes after it, as a multiple of
/// the base rate (0 before the moment and once it has faded).
pub fn spike_boost(multiplier: f64, minutes_since: f64) -> f64 {
    let extra = (multiplier - 1.0).max(0.0);
    if minutes_since < 0.0 {
        return 0.0;
    }
    if minutes_since < SPIKE_HOLD_MINUTES {
        return extra;
    }
    let decaying = minutes_since - SPIKE_HOLD_MINUTES;
    if decaying > DECAY_CUTOFF_MINUTES {
        return 0.0;
    }
    extra * (-decaying / DECAY_TAU_MINUTES).exp()
}

/// Whether the ball is in play at a point of the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Play,
    Break,
}

/// A moment placed on the curve.
#[derive(Debug, Clone)]
pub struct Spike {
    pub minute: f64,
    pub kind: MomentKind,
    pub multiplier: f64,
    /// Team code the moment is for, if the file names one.
    pub team: Option<String>,
}

/// The curve at one match minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePoint {
    /// Target rate in events per real second.
    pub events_per_s: f64,
    pub phase: Phase,
    /// Total multiple of the base rate (phase factor plus the spike's boost).
    pub factor: f64,
    /// The loudest moment at this minute and its boost, if any moment is still heard.
    pub spike: Option<(usize, f64)>,
}

impl RatePoint {
    /// Fraction of the traffic that is a reaction to the current moment (0 in quiet play).
    pub fn spike_share(&self) -> f64 {
        match self.spike {
            Some((_, boost)) if self.factor > 0.0 => boost / self.factor,
            _ => 0.0,
        }
    }
}

/// Target event rate over a match.
///
/// The rate is `base_rate x (phase factor + boost of the loudest moment)`. The loudest
/// moment wins instead of summing, so a run of shootout kicks stays near one goal's peak
/// instead of stacking to hundreds of times the base.
#[derive(Debug, Clone)]
pub struct RateCurve {
    base_rate: f64,
    spikes: Vec<Spike>,
    /// `[start, end)` match minutes during which the ball is in play.
    play: Vec<(f64, f64)>,
    end_minute: f64,
}

impl RateCurve {
    /// Builds the curve of a match at `base_rate` events per real second of open play.
    pub fn new(file: &MatchFile, base_rate: f64) -> RateCurve {
        let spikes = file
            .moments
            .iter()
            .map(|m| Spike {
                minute: f64::from(m.minute),
                kind: m.kind,
                multiplier: peak_multiplier(m.kind),
                team: m.team.clone(),
            })
            .collect();
        let play = file
            .periods
            .iter()
            .filter(|p| !p.is_break())
            .map(|p| (p.start_minute, p.end_minute))
            .collect();
        RateCurve {
            base_rate,
            spikes,
            play,
            end_minute: file.end_minute(),
        }
    }

    /// Last match minute of the replay.
    pub fn end_minute(&self) -> f64 {
        self.end_minute
    }

    /// The moments on the curve, in minute order.
    pub fn spikes(&self) -> &[Spike] {
        &self.spikes
    }

    /// Whether play is on at a match minute.
    pub fn phase_at(&self, minute: f64) -> Phase {
        let in_play = self.play.iter().any(|&(s, e)| minute >= s && minute < e);
        if in_play {
            Phase::Play
        } else {
            Phase::Break
        }
    }

    /// The curve at a match minute.
    pub fn at(&self, minute: f64) -> RatePoint {
        let phase = self.phase_at(minute);
        let phase_factor = match phase {
            Phase::Play => 1.0,
            Phase::Break => BREAK_FACTOR,
        };

        let mut loudest: Option<(usize, f64)> = None;
        for (i, spike) in self.spikes.iter().enumerate() {
            let boost = spike_boost(spike.multiplier, minute - spike.minute);
            if boost > 0.0 && loudest.is_none_or(|(_, b)| boost > b) {
                loudest = Some((i, boost));
            }
        }

        let factor = phase_factor + loudest.map_or(0.0, |(_, b)| b);
        RatePoint {
            events_per_s: self.base_rate * factor,
            phase,
            factor,
            spike: loudest,
        }
    }
}

/// Match minute reached after `real_s` seconds of a replay at `speed`.
pub fn minute_at(real_s: f64, speed: f64) -> f64 {
    real_s * speed / 60.0
}

/// Real time a replay of `minutes` match minutes takes at `speed`.
pub fn real_duration(minutes: f64, speed: f64) -> Duration {
    Duration::from_secs_f64(minutes * 60.0 / speed)
}

/// One batch the pacer wants sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedBatch {
    /// When to send it, from the start of the replay (the open-model "intended" time).
    pub due: Duration,
    /// The match time the batch's events cover, `[minute_from, minute_to)`.
    pub minute_from: f64,
    pub minute_to: f64,
    /// The curve when the batch falls due.
    pub point: RatePoint,
}

/// Turns the curve into a sequence of batch send times (open model: the plan never waits
/// for the server).
///
/// It integrates the rate in 1 ms steps and emits a batch whenever a batch's worth of
/// events has built up. The sequence is finite: it ends at the curve's last minute.
pub struct Pacer<'a> {
    curve: &'a RateCurve,
    speed: f64,
    batch_events: f64,
    steps_done: u64,
    total_steps: u64,
    accumulated: f64,
    last_minute: f64,
}

impl<'a> Pacer<'a> {
    /// A pacer for batches of `batch_events` at `speed` (both must be positive).
    pub fn new(curve: &'a RateCurve, speed: f64, batch_events: usize) -> Pacer<'a> {
        let real_s = real_duration(curve.end_minute(), speed).as_secs_f64();
        Pacer {
            curve,
            speed,
            batch_events: batch_events.max(1) as f64,
            steps_done: 0,
            total_steps: (real_s / PACER_STEP_S).ceil() as u64,
            accumulated: 0.0,
            last_minute: 0.0,
        }
    }
}

impl Iterator for Pacer<'_> {
    type Item = PlannedBatch;

    fn next(&mut self) -> Option<PlannedBatch> {
        loop {
            let t = self.steps_done as f64 * PACER_STEP_S;
            let minute = minute_at(t, self.speed).min(self.curve.end_minute());

            // A rate above one batch per step emits several batches at the same instant.
            if self.accumulated >= self.batch_events {
                self.accumulated -= self.batch_events;
                let from = self.last_minute;
                self.last_minute = minute;
                return Some(PlannedBatch {
                    due: Duration::from_secs_f64(t),
                    minute_from: from,
                    minute_to: minute,
                    point: self.curve.at((from + minute) / 2.0),
                });
            }
            if self.steps_done >= self.total_steps {
                return None;
            }

            self.accumulated += self.curve.at(minute).events_per_s * PACER_STEP_S;
            self.steps_done += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_like() -> MatchFile {
        MatchFile::parse(
            r#"{
            "match_id": "m", "home": "ARG", "away": "FRA",
            "periods": [
                {"name": "first_half", "start_minute": 0, "end_minute": 45},
                {"name": "half_time", "start_minute": 45, "end_minute": 60},
                {"name": "second_half", "start_minute": 60, "end_minute": 105}
            ],
            "moments": [
                {"minute": 23, "kind": "goal", "team": "ARG"},
                {"minute": 70, "kind": "penalty_awarded", "team": "FRA"},
                {"minute": 90, "kind": "substitution", "team": "FRA"}
            ]
        }"#,
        )
        .expect("valid fixture")
    }

    #[test]
    fn goal_minute_jumps_to_the_goal_multiplier() {
        let curve = RateCurve::new(&final_like(), 400.0);
        let before = curve.at(22.5).events_per_s;
        let during = curve.at(23.5).events_per_s;
        assert_eq!(before, 400.0);
        assert_eq!(during, 400.0 * peak_multiplier(MomentKind::Goal));
        assert!((30.0..=50.0).contains(&peak_multiplier(MomentKind::Goal)));
    }

    #[test]
    fn spike_decays_exponentially_back_to_base() {
        let curve = RateCurve::new(&final_like(), 400.0);
        let at = |m: f64| curve.at(m).events_per_s;
        assert!(at(24.5) < at(23.9));
        assert!(at(25.5) < at(24.5));
        assert!(at(25.5) > 400.0);
        let one_tau_later = 400.0 + 400.0 * 39.0 * (-1.0f64).exp();
        assert!((at(25.0) - one_tau_later).abs() < 1e-6);
        assert_eq!(at(35.0), 400.0);
    }

    #[test]
    fn kinds_are_ordered_goal_over_penalty_over_substitution() {
        let goal = peak_multiplier(MomentKind::Goal);
        let shootout = peak_multiplier(MomentKind::ShootoutGoal);
        let penalty = peak_multiplier(MomentKind::PenaltyAwarded);
        let save = peak_multiplier(MomentKind::BigSave);
        let sub = peak_multiplier(MomentKind::Substitution);
        assert!(goal >= shootout && shootout >= 30.0);
        assert_eq!(penalty, 10.0);
        assert_eq!(save, 10.0);
        assert_eq!(sub, 2.0);
    }

    #[test]
    fn half_time_runs_below_base() {
        let curve = RateCurve::new(&final_like(), 400.0);
        let point = curve.at(50.0);
        assert_eq!(point.phase, Phase::Break);
        assert_eq!(point.events_per_s, 400.0 * BREAK_FACTOR);
        assert_eq!(point.spike_share(), 0.0);
    }

    #[test]
    fn loudest_moment_wins_instead_of_summing() {
        let file = MatchFile::parse(
            r#"{"match_id": "m", "home": "A", "away": "B",
                "periods": [{"name": "shootout", "start_minute": 0, "end_minute": 10}],
                "moments": [{"minute": 3, "kind": "goal"}, {"minute": 4, "kind": "goal"}]}"#,
        )
        .expect("valid fixture");
        let curve = RateCurve::new(&file, 100.0);
        let point = curve.at(4.5);
        assert_eq!(point.factor, peak_multiplier(MomentKind::Goal));
        assert_eq!(point.spike.map(|(i, _)| i), Some(1));
        assert!(point.spike_share() > 0.95);
    }

    #[test]
    fn speed_scales_match_time_not_rate() {
        assert_eq!(real_duration(172.0, 60.0), Duration::from_secs(172));
        assert_eq!(real_duration(172.0, 600.0), Duration::from_millis(17_200));
        assert_eq!(minute_at(23.0, 60.0), 23.0);
        assert_eq!(minute_at(2.3, 600.0), 23.0);

        let curve = RateCurve::new(&final_like(), 400.0);
        let last_due = |speed| Pacer::new(&curve, speed, 25).last().expect("batches").due;
        let at_60 = last_due(60.0).as_secs_f64();
        let at_600 = last_due(600.0).as_secs_f64();
        assert!((104.0..=105.0).contains(&at_60), "{at_60}");
        assert!((10.4..=10.5).contains(&at_600), "{at_600}");
    }

    #[test]
    fn pacer_sends_what_the_curve_integrates_to() {
        let curve = RateCurve::new(&final_like(), 400.0);
        let batches: Vec<PlannedBatch> = Pacer::new(&curve, 60.0, 25).collect();

        // Expected: 90 minutes of play and 15 of break at 400 ev/s, plus the moments.
        let quiet = (90.0 + 15.0 * BREAK_FACTOR) * 400.0;
        let spike_area = |m: f64| (m - 1.0) * (SPIKE_HOLD_MINUTES + DECAY_TAU_MINUTES) * 400.0;
        let expected = quiet + spike_area(40.0) + spike_area(10.0) + spike_area(2.0);
        let sent = batches.len() as f64 * 25.0;
        assert!(
            (sent - expected).abs() / expected < 0.01,
            "{sent} vs {expected}"
        );

        // Intended times never go backwards and cover match time without gaps.
        for pair in batches.windows(2) {
            assert!(pair[1].due >= pair[0].due);
            assert_eq!(pair[1].minute_from, pair[0].minute_to);
        }
    }

    #[test]
    fn pacer_puts_the_spike_in_the_goal_minute() {
        let curve = RateCurve::new(&final_like(), 400.0);
        let mut per_minute = vec![0usize; 106];
        for b in Pacer::new(&curve, 60.0, 25) {
            per_minute[b.minute_to.floor() as usize] += 25;
        }
        let ratio = per_minute[23] as f64 / per_minute[10] as f64;
        assert!((38.0..=42.0).contains(&ratio), "ratio {ratio}");
        assert!(per_minute[24] > per_minute[25] && per_minute[25] > per_minute[26]);
    }
}
