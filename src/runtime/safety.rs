//! Safety between the policy and the wheels: when to hold still ([`Gate`]) and how far a driving
//! command may go ([`SafetyFilter`]: dead-zone, velocity and acceleration limits).
//!
//! Stops are immediate: a hold never ramps down through the acceleration limit, because an
//! e-stop, a released deadman or a stale camera must not keep the robot rolling.

use super::{Command, ZERO};

/// Per-axis limits on `(vx, vy, wz)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SafetyLimits {
    /// Largest |velocity| per axis [m/s, m/s, rad/s].
    pub max_vel: Command,
    /// Largest change of velocity per second per axis [m/s², m/s², rad/s²].
    pub max_acc: Command,
    /// Policy outputs with |v| below this are zeroed per axis (the fork's 0.15).
    pub dead_zone: f32,
}

impl SafetyLimits {
    /// The message names the offending parameter (`max_vel_x`, `max_acc_wz`, `dead_zone`).
    pub fn validate(&self) -> Result<(), String> {
        for (kind, values, strict) in [("vel", self.max_vel, false), ("acc", self.max_acc, true)] {
            for (axis, v) in ["x", "y", "wz"].iter().zip(values) {
                if !v.is_finite() || v < 0.0 || (strict && v == 0.0) {
                    let bound = if strict { "> 0" } else { "≥ 0" };
                    return Err(format!(
                        "`max_{kind}_{axis}` is {v}: it must be a number {bound}"
                    ));
                }
            }
        }
        if !(self.dead_zone.is_finite() && self.dead_zone >= 0.0) {
            return Err(format!("`dead_zone` is {}: it must be ≥ 0", self.dead_zone));
        }
        Ok(())
    }
}

/// Shapes driving commands; remembers the last one for the acceleration limit.
#[derive(Debug, Clone)]
pub struct SafetyFilter {
    limits: SafetyLimits,
    last: Command,
}

impl SafetyFilter {
    pub fn new(limits: SafetyLimits) -> Self {
        Self { limits, last: ZERO }
    }

    pub fn set_limits(&mut self, limits: SafetyLimits) {
        self.limits = limits;
    }

    /// The command for a policy `target`, `dt` seconds after the previous command: dead-zone,
    /// then the velocity clamp, then at most `max_acc·dt` away from the previous command.
    pub fn drive(&mut self, target: Command, dt: f64) -> Command {
        let l = &self.limits;
        let mut out = ZERO;
        for k in 0..3 {
            let mut v = target[k];
            if !v.is_finite() || v.abs() < l.dead_zone {
                v = 0.0;
            }
            v = v.clamp(-l.max_vel[k], l.max_vel[k]);
            let step = l.max_acc[k] * dt.max(0.0) as f32;
            out[k] = v.clamp(self.last[k] - step, self.last[k] + step);
        }
        self.last = out;
        out
    }

    /// Standing still, at once.
    pub fn stop(&mut self) -> Command {
        self.last = ZERO;
        ZERO
    }
}

/// Why the robot is held still instead of driven, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    Disabled,
    EStop,
    /// The operator's heartbeat stopped (or the deadman was released).
    Deadman,
    /// No image, or the newest is older than `max_image_age_s`.
    StaleImage,
    /// The running inference is later than `max_inference_s`.
    InferenceLate,
    /// The last inference failed.
    InferenceFailed,
    /// No chunk has an action due now (waiting for the first inference after a new instruction,
    /// a reset or the watchdog, or every chunk arrived too late).
    NoAction,
}

impl HoldReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::EStop => "e-stop latched (call ~/reset_e_stop)",
            Self::Deadman => "no operator heartbeat",
            Self::StaleImage => "camera image too old",
            Self::InferenceLate => "inference later than max_inference_s",
            Self::InferenceFailed => "inference failed",
            Self::NoAction => "no action due (waiting for a fresh inference)",
        }
    }
}

/// The node's safety state. Times are seconds on a monotonic clock.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    pub enabled: bool,
    e_stop: bool,
    /// `Some(timeout)` when a deadman is configured.
    heartbeat_timeout: Option<f64>,
    last_heartbeat: Option<f64>,
    last_image: Option<f64>,
    /// When the running inference started, if one runs.
    pub inference_since: Option<f64>,
    /// The last inference failed (cleared by the next good one).
    pub inference_failed: bool,
}

impl Gate {
    pub fn new(heartbeat_timeout: Option<f64>) -> Self {
        Self {
            heartbeat_timeout,
            ..Self::default()
        }
    }

    /// Latches until [`Gate::reset_e_stop`].
    pub fn e_stop(&mut self) {
        self.e_stop = true;
    }

    pub fn reset_e_stop(&mut self) {
        self.e_stop = false;
    }

    pub fn e_stopped(&self) -> bool {
        self.e_stop
    }

    /// `pressed = false` (a released deadman) stops the robot until the next heartbeat.
    pub fn heartbeat(&mut self, now: f64, pressed: bool) {
        self.last_heartbeat = pressed.then_some(now);
    }

    pub fn image(&mut self, now: f64) {
        self.last_image = Some(now);
    }

    pub fn image_age(&self, now: f64) -> Option<f64> {
        self.last_image.map(|t| now - t)
    }

    /// Why the robot must hold still at `now`, ignoring whether a chunk has an action due
    /// (the caller adds [`HoldReason::NoAction`]); `None` = it may drive.
    pub fn hold(&self, now: f64, max_image_age: f64, max_inference: f64) -> Option<HoldReason> {
        if !self.enabled {
            return Some(HoldReason::Disabled);
        }
        if self.e_stop {
            return Some(HoldReason::EStop);
        }
        if let Some(timeout) = self.heartbeat_timeout {
            if self.last_heartbeat.is_none_or(|t| now - t > timeout) {
                return Some(HoldReason::Deadman);
            }
        }
        if self.image_age(now).is_none_or(|age| age > max_image_age) {
            return Some(HoldReason::StaleImage);
        }
        if self
            .inference_since
            .is_some_and(|t| now - t > max_inference)
        {
            return Some(HoldReason::InferenceLate);
        }
        if self.inference_failed {
            return Some(HoldReason::InferenceFailed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SafetyLimits {
        SafetyLimits {
            max_vel: [0.5, 0.3, 1.0],
            max_acc: [1.0, 1.0, 2.0],
            dead_zone: 0.15,
        }
    }

    #[test]
    fn dead_zone_velocity_and_acceleration_limits() {
        let mut f = SafetyFilter::new(limits());
        // Below the dead-zone → 0; large outputs clamp; the ramp is max_acc·dt per command.
        assert_eq!(f.drive([0.1, -0.14, 0.149], 1.0), [0.0, 0.0, 0.0]);
        assert_eq!(f.drive([3.0, -3.0, 5.0], 0.1), [0.1, -0.1, 0.2]);
        assert_eq!(f.drive([3.0, -3.0, 5.0], 10.0), [0.5, -0.3, 1.0]);
        // Slowing down is rate-limited too while driving …
        let slowed = f.drive([0.0, 0.0, 0.0], 0.1);
        assert!((slowed[0] - 0.4).abs() < 1e-6 && (slowed[2] - 0.8).abs() < 1e-6);
        // … but a stop is immediate, and the next ramp starts from zero.
        assert_eq!(f.stop(), ZERO);
        assert_eq!(f.drive([1.0, 0.0, 0.0], 0.1), [0.1, 0.0, 0.0]);
        assert_eq!(f.drive([f32::NAN, 0.0, 0.0], 0.1), [0.0, 0.0, 0.0]);
    }

    #[test]
    fn limits_are_validated_by_name() {
        assert!(limits().validate().is_ok());
        let mut l = limits();
        l.max_acc[2] = 0.0;
        assert!(l.validate().unwrap_err().contains("max_acc_wz"));
        let mut l = limits();
        l.max_vel[1] = -1.0;
        assert!(l.validate().unwrap_err().contains("max_vel_y"));
        let mut l = limits();
        l.dead_zone = f32::NAN;
        assert!(l.validate().unwrap_err().contains("dead_zone"));
    }

    #[test]
    fn gate_precedence_watchdog_and_latches() {
        let mut g = Gate::new(Some(0.5));
        assert_eq!(g.hold(0.0, 1.0, 5.0), Some(HoldReason::Disabled));
        g.enabled = true;
        g.e_stop();
        assert_eq!(g.hold(0.0, 1.0, 5.0), Some(HoldReason::EStop));
        g.heartbeat(0.0, true);
        assert_eq!(
            g.hold(0.1, 1.0, 5.0),
            Some(HoldReason::EStop),
            "e-stop latches"
        );
        g.reset_e_stop();
        assert_eq!(g.hold(0.1, 1.0, 5.0), Some(HoldReason::StaleImage));
        g.image(0.1);
        assert_eq!(g.hold(0.2, 1.0, 5.0), None);
        assert_eq!(g.hold(0.6, 1.0, 5.0), Some(HoldReason::Deadman));
        g.heartbeat(0.6, true);
        g.heartbeat(0.7, false);
        assert_eq!(g.hold(0.7, 1.0, 5.0), Some(HoldReason::Deadman), "released");
        g.heartbeat(0.8, true);
        assert_eq!(g.hold(1.2, 1.0, 5.0), Some(HoldReason::StaleImage));
        g.image(1.2);
        g.inference_since = Some(1.2);
        assert_eq!(g.hold(1.25, 1.0, 0.01), Some(HoldReason::InferenceLate));
        g.inference_since = None;
        g.inference_failed = true;
        assert_eq!(g.hold(1.25, 1.0, 0.01), Some(HoldReason::InferenceFailed));
        g.inference_failed = false;
        assert_eq!(g.hold(1.25, 1.0, 0.01), None);
    }
}
