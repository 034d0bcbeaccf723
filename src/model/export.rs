//! Export of a model directory's weights under RoboVLMs checkpoint names.

use crate::model::error::{ModelError, Result};
use crate::model::model_dir::{write_safetensors, WEIGHTS_FILE};
use crate::model::robovlms::robovlms_key;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Writes the model directory's weights as one safetensors file with RoboVLMs checkpoint names
/// (`model.backbone.<HF name>`, `model.action_token`, `model.act_head.*`).
pub fn export_robovlms(dir: &Path, out: &Path) -> Result<usize> {
    let weights = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|cause| {
        ModelError::Tensors {
            path: weights.clone(),
            cause,
        }
    })?;
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (robovlms_key(&name), t))
        .collect();
    let n = renamed.len();
    write_safetensors(out, &renamed)?;
    Ok(n)
}
