//! `mobile_vla model init`: a model directory with a Hugging Face Kosmos-2 backbone and a fresh
//! action token and policy head, initialised as RoboVLMs does: `action_token = zeros(D)`; the
//! LSTM keeps PyTorch's default `U(−1/√H, 1/√H)` for every weight and bias; each MLP `Linear` gets
//! `xavier_uniform_` weights and zero biases (`initialize_param` in `base_policy.py`).

use super::params::ModelFiles;
use super::TrainError;
use crate::config::TrainSetup;
use crate::data::image::ChannelOrder;
use crate::model::error::ModelError;
use crate::model::kosmos2::Kosmos2Config;
use crate::model::model_dir::{self, publish_model_dir};
use crate::model::tokenizer::PromptTokenizer;
use crate::model::{ActionSpec, LstmSpec, NormRange, PolicyConfig};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// The new head's shape and the robot's action layout.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub window_size: usize,
    pub fwd_pred_next_n: usize,
    /// 3: native `[vx, vy, wz]` without gripper; 7: the fork's `[x, y, 0, 0, 0, rz, gripper]`;
    /// 4: `[vx, vy, wz, gripper]`.
    pub action_dim: usize,
    pub head: LstmSpec,
    /// Actions are normalised from `[−norm, norm]`.
    pub norm: f32,
    pub dt: f32,
    pub seed: u64,
}

impl InitOptions {
    fn policy_config(&self) -> Result<PolicyConfig, TrainError> {
        let (gripper, robot_indices) = match self.action_dim {
            3 => (false, [0, 1, 2]),
            4 => (true, [0, 1, 2]),
            7 => (true, [0, 1, 5]),
            d => {
                return Err(TrainError::Unsupported(format!(
                    "--action-dim {d}: supported are 3 (vx, vy, wz), 4 (+ gripper) and 7 (the fork's layout)"
                )))
            }
        };
        let cfg = PolicyConfig {
            window_size: self.window_size,
            fwd_pred_next_n: self.fwd_pred_next_n,
            head: self.head,
            action: ActionSpec {
                dim: self.action_dim,
                gripper,
                robot_indices,
                norm: Some(NormRange {
                    min: -self.norm,
                    max: self.norm,
                }),
            },
            image_size: None,
            model_channel_order: ChannelOrder::Rgb,
            dt: self.dt,
        };
        cfg.validate().map_err(TrainError::Unsupported)?;
        Ok(cfg)
    }
}

fn uniform(
    rng: &mut rand::rngs::StdRng,
    shape: &[usize],
    bound: f64,
) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Fresh `action_token` and `act_head.*` tensors.
pub(crate) fn fresh_policy_tensors(
    cfg: &PolicyConfig,
    d: usize,
    seed: u64,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    t.insert(
        "action_token".to_owned(),
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
    );
    let (h, layers) = (cfg.head.hidden_size, cfg.head.num_layers);
    let k = 1.0 / (h as f64).sqrt();
    for l in 0..layers {
        let input = if l == 0 { d } else { h };
        for (name, shape) in [
            ("weight_ih", vec![4 * h, input]),
            ("weight_hh", vec![4 * h, h]),
            ("bias_ih", vec![4 * h]),
            ("bias_hh", vec![4 * h]),
        ] {
            t.insert(
                format!("act_head.rnn.{name}_l{l}"),
                uniform(&mut rng, &shape, k)?,
            );
        }
    }
    let [w0, w1, w2] = cfg.head.mlp_hidden;
    let n = cfg.fwd_pred_next_n;
    let mut mlp = |prefix: &str, out: usize| -> candle_core::Result<()> {
        for (i, (fan_in, fan_out)) in [(h, w0), (w0, w1), (w1, w2), (w2, out)]
            .into_iter()
            .enumerate()
        {
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            t.insert(
                format!("act_head.{prefix}.mlp.{}.weight", 2 * i),
                uniform(&mut rng, &[fan_out, fan_in], bound)?,
            );
            t.insert(
                format!("act_head.{prefix}.mlp.{}.bias", 2 * i),
                Tensor::zeros(fan_out, DType::F32, &Device::Cpu)?,
            );
        }
        Ok(())
    };
    mlp("actions", n * cfg.action.arm_dim())?;
    if cfg.action.gripper {
        mlp("gripper", n)?;
    }
    Ok(t)
}

/// Writes a new model directory `out` (which must not exist or be empty) from the HF folder `hf`.
pub fn init_model_dir(
    hf: &Path,
    out: &Path,
    opts: &InitOptions,
) -> Result<PolicyConfig, TrainError> {
    if out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(ModelError::config(out, "output folder exists and is not empty").into());
    }
    let cfg = opts.policy_config()?;
    let config_path = hf.join(model_dir::CONFIG_FILE);
    let tokenizer_path = hf.join(model_dir::TOKENIZER_FILE);
    let weights = crate::model::kosmos2::weight_files(hf).map_err(ModelError::from)?;
    if weights.is_empty() {
        return Err(ModelError::config(
            hf,
            "no model.safetensors (or sharded index) in the Hugging Face folder",
        )
        .into());
    }
    let mut tensors = HashMap::new();
    for f in &weights {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu).map_err(|cause| {
            ModelError::Tensors {
                path: f.clone(),
                cause,
            }
        })?;
        tensors.extend(loaded);
    }
    let mut files = ModelFiles {
        backbone: Kosmos2Config::from_file(&config_path).map_err(ModelError::from)?,
        tokenizer: PromptTokenizer::from_file(&tokenizer_path)?,
        tensors,
        source: hf.to_owned(),
    };
    let d = files.backbone.text_config.embed_dim;
    files
        .tensors
        .extend(fresh_policy_tensors(&cfg, d, opts.seed)?);
    // Building the policy checks every shape and tells which tensors it uses (the tied `lm_head`
    // is dropped). Nothing trains here; the setup only decides which tensors become `Var`s.
    let frozen = TrainSetup::layers(true, -1, false, false);
    let (_, params) = files.build(cfg.clone(), &frozen, false, 0)?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| ModelError::io(p, e));
    publish_model_dir(
        out,
        &read(&config_path)?,
        &read(&tokenizer_path)?,
        &cfg,
        &params.tensors(),
    )?;
    Ok(cfg)
}
