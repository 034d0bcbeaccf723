//! Which steps of a command stream become episode frames: one [`Sampler`] for live recording
//! (`recorder_node`) and bag import, so that recording a session live and importing its bag
//! give the same episode. Time is nanoseconds on any clock that only moves forward (the bag's
//! receive time, or time since the node started).
//!
//! * An episode starts with an `episode_start` frame, zero action ([`Sampler::start`]).
//! * **event** mode (the fork's keyboard collector): a command that differs from the previous
//!   one by [`ZERO_EPS`] or more is a step: `start_action` with the command when it moves,
//!   `stop_action` with a zero action when it stops (if `record_stops`). Repeats (a held key)
//!   are not steps.
//! * **rate** mode: a step every `period` from the start: the latest command, or zero once it
//!   is older than `cmd_timeout` (the teleop went silent); `start_action` when moving,
//!   `stop_action` when not.

use crate::data::episode::{Action, EventType};
use serde::Deserialize;
use std::time::Duration;

/// Commands whose components all lie within this of zero are "stopped"; components that
/// differ by less are "the same command" (teleop float noise).
pub const ZERO_EPS: f32 = 1e-4;

/// How steps are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SampleMode {
    /// One frame per command change (the fork's keyboard collector).
    Event,
    /// Frames at a fixed rate: latest image + latest command.
    Rate,
}

impl std::str::FromStr for SampleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "event" => Ok(SampleMode::Event),
            "rate" => Ok(SampleMode::Rate),
            other => Err(format!(
                "unknown mode `{other}`: expected `event` or `rate`"
            )),
        }
    }
}

/// A user-given number of seconds as a [`Duration`]; `what` names the setting in the error
/// (a negative, NaN or astronomically large value would make `Duration::from_secs_f64` panic).
pub fn seconds(what: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| format!("{what} is {s}: expected a duration in seconds, 0 to ~1.8e19"))
}

/// The period of a user-given rate in Hz, named `what` in the error.
pub fn period(what: &str, hz: f64) -> Result<Duration, String> {
    if !(hz > 0.0 && hz.is_finite()) {
        return Err(format!("{what} is {hz}: it must be > 0"));
    }
    match seconds(what, 1.0 / hz) {
        Ok(p) if !p.is_zero() => Ok(p),
        _ => Err(format!(
            "{what} is {hz}: expected a rate between 1e-19 and 1e9 Hz"
        )),
    }
}

/// `d` in nanoseconds, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub mode: SampleMode,
    /// Rate mode: time between steps.
    pub period: Duration,
    /// Rate mode: a command older than this counts as zero.
    pub cmd_timeout: Duration,
    /// Event mode: the return to zero is a `stop_action` step.
    pub record_stops: bool,
}

impl Default for SamplerConfig {
    /// Event mode with stops; 10 Hz and 0.5 s for rate mode (`config/recorder_node.yaml`).
    fn default() -> Self {
        Self {
            mode: SampleMode::Event,
            period: Duration::from_millis(100),
            cmd_timeout: Duration::from_millis(500),
            record_stops: true,
        }
    }
}

/// A step to record: the action and its label; the frame is the latest image at that time.
pub type Step = (Action, EventType);

pub fn is_moving(a: &Action) -> bool {
    a.iter().any(|v| v.abs() >= ZERO_EPS)
}

fn differs(a: &Action, b: &Action) -> bool {
    a.iter().zip(b).any(|(x, y)| (x - y).abs() >= ZERO_EPS)
}

#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    last_cmd: Action,
    last_cmd_at: Option<u64>,
    last_moving_at: Option<u64>,
    /// Rate mode: time of the next step while an episode runs.
    next_tick: Option<u64>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Self {
            cfg,
            last_cmd: [0.0; 3],
            last_cmd_at: None,
            last_moving_at: None,
            next_tick: None,
        }
    }

    /// An episode starts at `t`, from rest (the previous command is forgotten): its
    /// `episode_start` step.
    pub fn start(&mut self, t: u64) -> Step {
        self.last_cmd = [0.0; 3];
        self.last_cmd_at = None;
        self.next_tick = (self.cfg.mode == SampleMode::Rate)
            .then(|| t.saturating_add(nanos(self.cfg.period).max(1)));
        ([0.0; 3], EventType::EpisodeStart)
    }

    /// The episode ended: no more rate steps.
    pub fn stop(&mut self) {
        self.next_tick = None;
    }

    /// A command arrived at `t`; in event mode, the step it makes, if any.
    pub fn command(&mut self, t: u64, cmd: Action) -> Option<Step> {
        let changed = differs(&cmd, &self.last_cmd);
        self.last_cmd = cmd;
        self.last_cmd_at = Some(t);
        let moving = is_moving(&cmd);
        if moving {
            self.last_moving_at = Some(t);
        }
        if self.cfg.mode != SampleMode::Event || !changed {
            return None;
        }
        if moving {
            Some((cmd, EventType::StartAction))
        } else {
            self.cfg
                .record_stops
                .then_some(([0.0; 3], EventType::StopAction))
        }
    }

    /// When the next rate step is due (none in event mode or between episodes).
    pub fn next_tick(&self) -> Option<u64> {
        self.next_tick
    }

    /// The next rate step due before `t` (call until `None`; each sees the commands up to its
    /// own time when called before the command at `t` is given), with its time.
    pub fn tick_before(&mut self, t: u64) -> Option<(u64, Step)> {
        let tick = self.next_tick.filter(|&k| k < t)?;
        self.next_tick = Some(tick.saturating_add(nanos(self.cfg.period).max(1)));
        let fresh = self
            .last_cmd_at
            .is_some_and(|c| tick.saturating_sub(c) <= nanos(self.cfg.cmd_timeout));
        let cmd = if fresh { self.last_cmd } else { [0.0; 3] };
        Some(if is_moving(&cmd) {
            (tick, (cmd, EventType::StartAction))
        } else {
            (tick, ([0.0; 3], EventType::StopAction))
        })
    }

    /// Nanoseconds from the last command (any, zero included) to `t`.
    pub fn since_command(&self, t: u64) -> Option<u64> {
        self.last_cmd_at.map(|c| t.saturating_sub(c))
    }

    /// Nanoseconds from the last moving command to `t`.
    pub fn since_moving(&self, t: u64) -> Option<u64> {
        self.last_moving_at.map(|c| t.saturating_sub(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn event_mode_records_changes_only() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.start(0), ([0.0; 3], EventType::EpisodeStart));
        assert_eq!(
            s.command(1, [0.5, 0.0, 0.0]),
            Some(([0.5, 0.0, 0.0], EventType::StartAction))
        );
        assert_eq!(s.command(2, [0.5, 0.0, 0.0]), None, "held key repeats");
        assert_eq!(s.command(3, [0.50001, 0.0, 0.0]), None, "float noise");
        assert_eq!(
            s.command(4, [0.0, 0.0, 0.00001]),
            Some(([0.0; 3], EventType::StopAction)),
            "within ZERO_EPS of zero is a stop"
        );
        assert_eq!(s.command(5, [0.0; 3]), None);
        let mut quiet = Sampler::new(SamplerConfig {
            record_stops: false,
            ..SamplerConfig::default()
        });
        quiet.start(0);
        quiet.command(1, [0.5, 0.0, 0.0]);
        assert_eq!(quiet.command(2, [0.0; 3]), None);
    }

    #[test]
    fn rate_mode_ticks_from_the_start_and_zeroes_stale_commands() {
        let mut s = Sampler::new(SamplerConfig {
            mode: SampleMode::Rate,
            ..SamplerConfig::default()
        });
        assert_eq!(s.tick_before(u64::MAX), None, "no episode, no ticks");
        s.start(1000 * MS);
        assert_eq!(s.command(1050 * MS, [0.3, 0.1, 0.0]), None);
        assert_eq!(s.tick_before(1100 * MS), None, "due at 1100, not before");
        assert_eq!(
            s.tick_before(1100 * MS + 1),
            Some((1100 * MS, ([0.3, 0.1, 0.0], EventType::StartAction)))
        );
        // 1200..=1500 fresh (≤ 0.5 s after 1050 ms); 1600 stale.
        let ticks: Vec<_> = std::iter::from_fn(|| s.tick_before(1650 * MS)).collect();
        assert_eq!(ticks.len(), 5);
        assert_eq!(
            ticks[3],
            (1500 * MS, ([0.3, 0.1, 0.0], EventType::StartAction))
        );
        assert_eq!(ticks[4], (1600 * MS, ([0.0; 3], EventType::StopAction)));
        assert_eq!(s.since_command(2050 * MS), Some(1000 * MS));
        s.stop();
        assert_eq!(s.tick_before(u64::MAX), None);
    }

    #[test]
    fn user_durations_are_checked_not_panics() {
        assert!(seconds("--split-on-idle", 1e300)
            .unwrap_err()
            .contains("--split-on-idle"));
        assert!(seconds("x", -1.0).is_err() && seconds("x", f64::NAN).is_err());
        assert_eq!(seconds("x", 1.5), Ok(Duration::from_millis(1500)));
        assert!(period("rate_hz", 1e-300).unwrap_err().contains("rate_hz"));
        assert!(period("rate_hz", 1e300).unwrap_err().contains("rate_hz"));
        assert!(period("rate_hz", 0.0).is_err());
        assert_eq!(period("rate_hz", 10.0), Ok(Duration::from_millis(100)));
    }
}
