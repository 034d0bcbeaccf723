//! Import of a RoboVLMs / Mobile VLA PyTorch Lightning `.ckpt` into a model directory.
//!
//! Like RoboVLMs, the import starts from the Hugging Face backbone and lays the checkpoint over it
//! (key mapping: [`crate::model::robovlms`]). Checkpoint keys that map to nothing are reported and
//! ignored; tensors the model does not use (e.g. the tied `lm_head`) are reported and dropped.

use crate::data::image::ChannelOrder;
use crate::model::config::{LstmSpec, PolicyConfig};
use crate::model::error::{ModelError, Result};
use crate::model::kosmos2::{self, Kosmos2Config};
use crate::model::model_dir::{
    build_policy, publish_model_dir, read, LoadOptions, CONFIG_FILE, TOKENIZER_FILE,
};
use crate::model::robovlms::config::{self as robovlms_config, RobotSide};
use crate::model::robovlms::{ckpt as robovlms_ckpt, map_ckpt_key};
use crate::model::tokenizer::PromptTokenizer;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the RoboVLMs config came from, for the report.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    CheckpointHyperParameters,
}

/// Options of [`import_robovlms`] that the checkpoint cannot tell.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `--config`; otherwise `hyper_parameters.configs` of the checkpoint.
    pub config: Option<PathBuf>,
    /// Checkpoint-layout indices of (vx, vy, wz); default by `action_dim` (7 → 0,1,5; 4 → 0,1,2).
    pub robot_indices: Option<[usize; 3]>,
    pub dt: f32,
    pub model_channel_order: ChannelOrder,
}

impl ImportOptions {
    fn robot_side(&self) -> RobotSide {
        RobotSide {
            robot_indices: self.robot_indices,
            dt: self.dt,
            model_channel_order: self.model_channel_order,
        }
    }
}

/// What an import did, for the user.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub config_source: ConfigSource,
    pub policy: PolicyConfig,
    /// Tensors taken from the checkpoint.
    pub from_checkpoint: usize,
    /// Backbone tensors the checkpoint lacked, taken from the Hugging Face model.
    pub from_hf: Vec<String>,
    /// Checkpoint keys that map to nothing (ignored).
    pub unmatched: Vec<String>,
    /// Mapped tensors the model does not use (dropped), e.g. the tied `lm_head`.
    pub unused: Vec<String>,
}

/// Head sizes as the checkpoint's tensors say (RoboVLMs configs do not name the MLP widths).
fn head_sizes(ckpt: &Path, tensors: &HashMap<String, Tensor>) -> Result<LstmSpec> {
    let dim0 = |name: &str| -> Result<usize> {
        let t = tensors.get(name).ok_or_else(|| ModelError::Checkpoint {
            path: ckpt.to_owned(),
            msg: format!("missing tensor `{name}` (RoboVLMs key `model.{name}`)"),
        })?;
        Ok(t.dims().first().copied().unwrap_or(0))
    };
    let num_layers = (0..)
        .take_while(|k| tensors.contains_key(&format!("act_head.rnn.weight_ih_l{k}")))
        .count();
    if num_layers == 0 {
        return Err(ModelError::Checkpoint {
            path: ckpt.to_owned(),
            msg: "no `act_head.rnn.weight_ih_l0`: not an LSTMDecoder checkpoint".into(),
        });
    }
    Ok(LstmSpec {
        hidden_size: dim0("act_head.rnn.weight_hh_l0")? / 4,
        num_layers,
        mlp_hidden: [
            dim0("act_head.actions.mlp.0.weight")?,
            dim0("act_head.actions.mlp.2.weight")?,
            dim0("act_head.actions.mlp.4.weight")?,
        ],
    })
}

/// Imports a RoboVLMs / Mobile VLA checkpoint into a new model directory `out` (which must not exist
/// or be empty). Nothing is left at `out` on error.
pub fn import_robovlms(
    ckpt: &Path,
    hf_model: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| ModelError::io(out, e))?
            .next()
            .is_some()
    {
        return Err(ModelError::config(
            out,
            "output folder exists and is not empty",
        ));
    }
    let hf_config = hf_model.join(CONFIG_FILE);
    let backbone_cfg = Kosmos2Config::from_file(&hf_config)?;
    let config_json = read(&hf_config)?;
    let tokenizer_path = hf_model.join(TOKENIZER_FILE);
    let tokenizer = PromptTokenizer::from_file(&tokenizer_path)?;
    let tokenizer_json = read(&tokenizer_path)?;

    // Checkpoint tensors, mapped.
    let pth = robovlms_ckpt::open_tensors(ckpt)?;
    let mut keys: Vec<&String> = pth.tensor_infos().keys().collect();
    keys.sort();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut unmatched = Vec::new();
    for key in keys {
        let Some(name) = map_ckpt_key(key) else {
            unmatched.push(key.clone());
            continue;
        };
        let t = pth
            .get(key)
            .map_err(|e| ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("tensor `{key}`: {e}"),
            })?
            .ok_or_else(|| ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("tensor `{key}` listed but unreadable"),
            })?;
        if tensors.insert(name.clone(), t).is_some() {
            return Err(ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("two keys map to `{name}` (e.g. with and without a `module.` prefix)"),
            });
        }
    }
    let from_checkpoint = tensors.len();

    // Policy config.
    let head = head_sizes(ckpt, &tensors)?;
    let (raw_cfg, config_source, cfg_path) = match &opts.config {
        Some(p) => (
            robovlms_config::read_config(p)?,
            ConfigSource::File(p.clone()),
            p.clone(),
        ),
        None => match robovlms_ckpt::hyper_parameters_configs(ckpt)? {
            Some(v) => (v, ConfigSource::CheckpointHyperParameters, ckpt.to_owned()),
            None => {
                return Err(ModelError::Checkpoint {
                    path: ckpt.to_owned(),
                    msg: "no `hyper_parameters.configs` in the checkpoint; pass the RoboVLMs JSON with --config".into(),
                })
            }
        },
    };
    let policy_cfg = robovlms_config::policy_config(&raw_cfg, &cfg_path, head, &opts.robot_side())?;

    // Backbone tensors the checkpoint lacks come from the HF model (RoboVLMs builds from it first).
    let mut from_hf = Vec::new();
    let hf_files = kosmos2::weight_files(hf_model)?;
    if !hf_files.is_empty() {
        // SAFETY: read-only mapping of files nobody rewrites during the import.
        let st = unsafe { MmapedSafetensors::multi(&hf_files) }.map_err(|cause| {
            ModelError::Tensors {
                path: hf_model.to_owned(),
                cause,
            }
        })?;
        for (name, _) in st.tensors() {
            if let std::collections::hash_map::Entry::Vacant(slot) = tensors.entry(name) {
                let t = st
                    .load(slot.key(), &Device::Cpu)
                    .map_err(|cause| ModelError::Tensors {
                        path: hf_model.to_owned(),
                        cause,
                    })?;
                from_hf.push(slot.key().clone());
                slot.insert(t);
            }
        }
        from_hf.sort();
    }

    // Build the policy once: checks every tensor's presence and shape, and tells which are used.
    let load = LoadOptions::default();
    let (_, used) = build_policy(
        tensors.clone(),
        policy_cfg.clone(),
        &backbone_cfg,
        tokenizer,
        &load,
    )
    .map_err(|cause| ModelError::Tensors {
        path: ckpt.to_owned(),
        cause,
    })?;
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unused.sort();
    tensors.retain(|k, _| used.contains(k));
    from_hf.retain(|k| used.contains(k));

    publish_model_dir(out, &config_json, &tokenizer_json, &policy_cfg, &tensors)?;
    Ok(ImportReport {
        config_source,
        policy: policy_cfg,
        from_checkpoint,
        from_hf,
        unmatched,
        unused,
    })
}
