//! policy_node's parameters (`config/policy_node.yaml`): declared, validated at start, and the
//! safety limits that `ros2 param set` changes live.

use super::super::params::NodeParams;
use crate::runtime::worker;
use crate::runtime::{ExecutionMode, SafetyLimits};
use r2r::RosParams;
use serde::Deserialize;

pub const NAME: &str = "policy_node";
pub const DEFAULTS: &str = include_str!("../../../config/policy_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct PolicyParams {
    /// Model directory loaded on configure
    pub model_dir: String,
    /// Weight format: f32, or i16 (12-bit packed, faster)
    pub dtype: String,
    /// Configure and activate at start
    pub autostart: bool,
    /// Camera topic
    pub image_topic: String,
    /// Subscribe to sensor_msgs/CompressedImage instead of sensor_msgs/Image
    pub compressed: bool,
    /// Instruction topic (std_msgs/String, volatile or transient-local)
    pub instruction_topic: String,
    /// Instruction used until one is published
    pub instruction: String,
    /// Velocity command output topic
    pub cmd_vel_topic: String,
    /// Publish geometry_msgs/TwistStamped instead of Twist
    pub cmd_stamped: bool,
    /// frame_id of TwistStamped and ActionChunk headers
    pub frame_id: String,
    /// Control loop rate [Hz]
    pub control_rate_hz: f64,
    /// first | chunk | ensemble
    pub execution_mode: String,
    /// Ensemble weight exponent per chunk (ACT: 0.01)
    pub ensemble_decay: f64,
    /// An image gap longer than this starts a new history [s]
    pub history_reset_s: f64,
    /// Watchdog: a newest image older than this commands zero [s]
    pub max_image_age_s: f64,
    /// An inference running longer than this commands zero and its chunk is dropped [s]
    pub max_inference_s: f64,
    /// Velocity limit, linear x [m/s]
    pub max_vel_x: f64,
    /// Velocity limit, linear y [m/s]
    pub max_vel_y: f64,
    /// Velocity limit, angular z [rad/s]
    pub max_vel_wz: f64,
    /// Acceleration limit, linear x [m/s^2]
    pub max_acc_x: f64,
    /// Acceleration limit, linear y [m/s^2]
    pub max_acc_y: f64,
    /// Acceleration limit, angular z [rad/s^2]
    pub max_acc_wz: f64,
    /// Policy outputs below this magnitude are zeroed per axis
    pub dead_zone: f64,
    /// E-stop topic (std_msgs/Bool, true latches until ~/reset_e_stop)
    pub e_stop_topic: String,
    /// Deadman topic (std_msgs/Bool, true = held); empty disables the deadman
    pub heartbeat_topic: String,
    /// No heartbeat for this long commands zero [s]
    pub heartbeat_timeout_s: f64,
    /// Reload models announced on model_ready_topic
    pub follow_trainer: bool,
    /// trainer_node's model announcements (std_msgs/String, transient-local)
    pub model_ready_topic: String,
}

impl PolicyParams {
    pub fn limits(&self) -> SafetyLimits {
        let f = |v: f64| v as f32;
        SafetyLimits {
            max_vel: [f(self.max_vel_x), f(self.max_vel_y), f(self.max_vel_wz)],
            max_acc: [f(self.max_acc_x), f(self.max_acc_y), f(self.max_acc_wz)],
            dead_zone: f(self.dead_zone),
        }
    }

    pub(super) fn mode(&self) -> Result<ExecutionMode, String> {
        self.execution_mode
            .parse()
            .map_err(|e| format!("`execution_mode`: {e}"))
    }
}

impl NodeParams for PolicyParams {
    // Read every control period.
    const LIVE: &'static [&'static str] = &[
        "max_vel_x",
        "max_vel_y",
        "max_vel_wz",
        "max_acc_x",
        "max_acc_y",
        "max_acc_wz",
        "dead_zone",
        "max_image_age_s",
        "max_inference_s",
    ];

    fn validate(&self) -> Result<(), String> {
        if self.model_dir.trim().is_empty() {
            return Err("`model_dir` is empty: give the model directory to serve".into());
        }
        worker::load_options(&self.dtype)?;
        self.mode()?;
        self.limits().validate()?;
        for (name, v) in [
            ("control_rate_hz", self.control_rate_hz),
            ("history_reset_s", self.history_reset_s),
            ("max_image_age_s", self.max_image_age_s),
            ("max_inference_s", self.max_inference_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("`{name}` is {v}: it must be > 0"));
            }
        }
        if !(self.ensemble_decay.is_finite() && self.ensemble_decay >= 0.0) {
            return Err(format!(
                "`ensemble_decay` is {}: it must be ≥ 0",
                self.ensemble_decay
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validation_names_the_parameter() {
        let mut p: PolicyParams =
            crate::ros::params::from_yaml(DEFAULTS, "config/policy_node.yaml", NAME).unwrap();
        assert!(p.validate().unwrap_err().contains("model_dir"));
        p.model_dir = "model".into();
        p.validate().unwrap();
        assert_eq!(p.limits().dead_zone, 0.15);
        for (field, set) in [
            (
                "execution_mode",
                Box::new(|p: &mut PolicyParams| p.execution_mode = "all".into())
                    as Box<dyn Fn(&mut PolicyParams)>,
            ),
            ("dtype", Box::new(|p| p.dtype = "f16".into())),
            ("control_rate_hz", Box::new(|p| p.control_rate_hz = 0.0)),
            ("max_vel_wz", Box::new(|p| p.max_vel_wz = -1.0)),
        ] {
            let mut bad = p.clone();
            set(&mut bad);
            assert!(bad.validate().unwrap_err().contains(field), "{field}");
        }
    }
}
