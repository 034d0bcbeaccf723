//! `policy.json`: the policy's own configuration ([`PolicyConfig`] and its parts), everything the
//! backbone's `config.json` does not say. The policy, model directories and the RoboVLMs import all
//! depend on these types; they depend on nothing above them.

use crate::data::image::ChannelOrder;
use crate::model::error::{ModelError, Result};
use crate::model::head::HeadConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Action normalisation range (`action.norm`); the formula is shared with the dataset.
pub use crate::data::dataset::NormRange;

/// `policy.json`: everything about the policy that the backbone's `config.json` does not say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Frames of history the head fuses (RoboVLMs `window_size`).
    pub window_size: usize,
    /// Future steps predicted per frame (RoboVLMs `fwd_pred_next_n`).
    pub fwd_pred_next_n: usize,
    #[serde(default)]
    pub head: LstmSpec,
    pub action: ActionSpec,
    /// Side of the square model input; `None` = the vision config's `image_size`.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Channel order the model was trained on. `step` takes true-RGB frames and swaps them when this
    /// is `bgr` (e.g. a Mobile VLA fork checkpoint trained on stored BGR frames fed unconverted).
    #[serde(default = "default_channel_order")]
    pub model_channel_order: ChannelOrder,
    /// Seconds each chunk step spans on the robot.
    pub dt: f32,
}

fn default_channel_order() -> ChannelOrder {
    ChannelOrder::Rgb
}

/// Sizes of `LSTMDecoder` (RoboVLMs: LSTM hidden 1024 × 4 layers, MLP widths 1024, 512, 256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LstmSpec {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub mlp_hidden: [usize; 3],
}

impl Default for LstmSpec {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            num_layers: 4,
            mlp_hidden: [1024, 512, 256],
        }
    }
}

/// The checkpoint's action layout and how it maps to the robot's `(vx, vy, wz)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// Width of the checkpoint's action vector, gripper included (3 native; 7 for RoboVLMs' manipulator head).
    pub dim: usize,
    /// The last dim is a gripper predicted as a logit by its own MLP (RoboVLMs heads); it is dropped
    /// for the robot.
    #[serde(default)]
    pub gripper: bool,
    /// Indices in the checkpoint layout of `linear_x`, `linear_y`, `angular_z`
    /// (`[0, 1, 2]` native; `[0, 1, 5]` for the Mobile VLA fork's `[x, y, 0, 0, 0, rz, gripper]`).
    pub robot_indices: [usize; 3],
    /// Action normalisation range (`norm_min`/`norm_max`); `None` = the head predicts raw actions.
    #[serde(default)]
    pub norm: Option<NormRange>,
}

impl ActionSpec {
    /// Continuous dims predicted by the tanh MLP.
    pub fn arm_dim(&self) -> usize {
        self.dim - usize::from(self.gripper)
    }
}

impl PolicyConfig {
    /// A native 3-DoF head `[linear_x, linear_y, angular_z]`, actions normalised to ±`norm`.
    pub fn native(window_size: usize, fwd_pred_next_n: usize, norm: f32, dt: f32) -> Self {
        Self {
            window_size,
            fwd_pred_next_n,
            head: LstmSpec::default(),
            action: ActionSpec {
                dim: 3,
                gripper: false,
                robot_indices: [0, 1, 2],
                norm: Some(NormRange {
                    min: -norm,
                    max: norm,
                }),
            },
            image_size: None,
            model_channel_order: ChannelOrder::Rgb,
            dt,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
        cfg.validate()
            .map_err(|msg| ModelError::config(path, msg))?;
        Ok(cfg)
    }

    /// Checks the values describe a working policy; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let a = &self.action;
        if self.window_size == 0 {
            return Err("`window_size` must be ≥ 1".into());
        }
        if self.fwd_pred_next_n == 0 {
            return Err("`fwd_pred_next_n` must be ≥ 1".into());
        }
        if self.head.hidden_size == 0
            || self.head.num_layers == 0
            || self.head.mlp_hidden.contains(&0)
        {
            return Err(
                "`head.hidden_size`, `head.num_layers` and `head.mlp_hidden` must be ≥ 1".into(),
            );
        }
        if a.dim < 1 + usize::from(a.gripper) {
            return Err(format!("`action.dim` {} leaves no continuous dims", a.dim));
        }
        if let Some(i) = a.robot_indices.iter().find(|&&i| i >= a.arm_dim()) {
            return Err(format!(
                "`action.robot_indices` holds {i}, outside the {} continuous dims",
                a.arm_dim()
            ));
        }
        if let Some(n) = a.norm {
            if !n.is_valid() {
                return Err(format!(
                    "`action.norm` needs finite min < max, got {} / {}",
                    n.min, n.max
                ));
            }
        }
        if self.image_size == Some(0) {
            return Err("`image_size` must be ≥ 1".into());
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return Err(format!(
                "`dt` must be a positive number of seconds, got {}",
                self.dt
            ));
        }
        Ok(())
    }

    pub(crate) fn head_config(&self, in_features: usize) -> HeadConfig {
        HeadConfig {
            in_features,
            hidden_size: self.head.hidden_size,
            num_layers: self.head.num_layers,
            fwd_pred_next_n: self.fwd_pred_next_n,
            window_size: self.window_size,
            arm_dim: self.action.arm_dim(),
            gripper: self.action.gripper,
            mlp_hidden: self.head.mlp_hidden,
        }
    }
}
