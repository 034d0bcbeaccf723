//! Run checkpoints: everything `--resume` needs to continue a run exactly.
//!
//! `<run>/checkpoints/step-<N>/` holds `trainable.safetensors` (the trained parameters),
//! `optimizer.safetensors` (`exp_avg.<name>`, `exp_avg_sq.<name>`) and `state.json` (position,
//! data order, schedule, fingerprint of config/model/data). Frozen weights are not copied: they are
//! the model directory's. `<run>/checkpoint.json` names the newest complete checkpoint and is
//! replaced atomically after it is written, so a kill at any moment leaves the previous one valid.

use super::TrainError;
use crate::fsutil::write_atomic;
use crate::train::optim::{AdamW, Moments};
use crate::train::params::ParamSet;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "mobile_vla-train-checkpoint/1";
pub const POINTER_FILE: &str = "checkpoint.json";
const STATE_FILE: &str = "state.json";
const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What a checkpoint must agree with to be resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The resolved training config (JSON).
    pub config: serde_json::Value,
    pub model_dir: PathBuf,
    /// Episode file names and sizes.
    pub data: Vec<(String, u64)>,
    /// Trainable parameter names, in order.
    pub trainable: Vec<String>,
}

/// Position and counters at an optimiser-step boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format: String,
    pub fingerprint: Fingerprint,
    /// Optimiser steps taken.
    pub step: u64,
    pub epoch: usize,
    /// Next batch of `epoch` to run.
    pub batch: usize,
    /// Sample order of `epoch` (seeded; stored so a resume never depends on re-deriving it).
    pub order: Vec<usize>,
    /// Lines of `metrics.jsonl` written up to this point.
    pub metrics_lines: usize,
    pub last_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
}

fn bad(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

/// Writes a checkpoint and points `<run>/checkpoint.json` at it; returns its folder.
pub fn save(
    run: &Path,
    state: &RunState,
    params: &ParamSet,
    opt: &AdamW,
) -> Result<PathBuf, TrainError> {
    let rel = PathBuf::from("checkpoints").join(format!("step-{:08}", state.step));
    let dir = run.join(&rel);
    let tmp = run
        .join("checkpoints")
        .join(format!(".tmp-{}", std::process::id()));
    let io = |p: &Path, e: std::io::Error| TrainError::Io {
        path: p.to_owned(),
        source: e,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let trainable: HashMap<String, Tensor> = params
        .trainable()
        .map(|(n, v)| (n.to_owned(), v.as_tensor().clone()))
        .collect();
    let mut moments = HashMap::new();
    for ((name, _), m) in params.trainable().zip(&opt.moments) {
        moments.insert(format!("exp_avg.{name}"), m.exp_avg.clone());
        moments.insert(format!("exp_avg_sq.{name}"), m.exp_avg_sq.clone());
    }
    let save_st = |file: &str, t: &HashMap<String, Tensor>| {
        let path = tmp.join(file);
        write_atomic(&path, |p| {
            candle_core::safetensors::save(t, p).map_err(std::io::Error::other)
        })
        .map_err(|e| io(&path, e))
    };
    save_st(TRAINABLE_FILE, &trainable)?;
    save_st(OPTIMIZER_FILE, &moments)?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| bad(&tmp, e.to_string()))?;
    let state_path = tmp.join(STATE_FILE);
    write_atomic(&state_path, |p| std::fs::write(p, &json)).map_err(|e| io(&state_path, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    let pointer = serde_json::json!({ "checkpoint": rel });
    let pointer_path = run.join(POINTER_FILE);
    write_atomic(&pointer_path, |p| {
        std::fs::write(p, serde_json::to_vec_pretty(&pointer)?)
    })
    .map_err(|e| io(&pointer_path, e))?;
    // Older checkpoints are superseded only once the pointer names the new one.
    if let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) {
        for e in entries.flatten() {
            if e.path() != dir {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(dir)
}

/// The checkpoint `<run>/checkpoint.json` names, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>, TrainError> {
    let pointer = run.join(POINTER_FILE);
    if !pointer.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&pointer).map_err(|e| TrainError::Io {
        path: pointer.clone(),
        source: e,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&pointer, format!("not JSON: {e}")))?;
    let rel = v
        .get("checkpoint")
        .and_then(|c| c.as_str())
        .ok_or_else(|| bad(&pointer, "no `checkpoint` path"))?;
    Ok(Some(run.join(rel)))
}

/// Reads a checkpoint and checks it belongs to this run (`expected`).
pub fn load(
    dir: &Path,
    expected: &Fingerprint,
) -> Result<(RunState, HashMap<String, Tensor>), TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::Io {
        path: state_path.clone(),
        source: e,
    })?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| {
        bad(
            &state_path,
            format!("not a mobile_vla training checkpoint ({e})"),
        )
    })?;
    if state.format != FORMAT {
        return Err(bad(
            &state_path,
            format!("format `{}`, expected `{FORMAT}`", state.format),
        ));
    }
    let f = &state.fingerprint;
    let differs = [
        (f.config != expected.config, "the training config"),
        (f.model_dir != expected.model_dir, "the model directory"),
        (f.data != expected.data, "the episodes"),
        (
            f.trainable != expected.trainable,
            "the trainable parameters (strategy)",
        ),
    ];
    if let Some((_, what)) = differs.iter().find(|(d, _)| *d) {
        return Err(bad(
            &state_path,
            format!(
                "written for another run: {what} differ; start a new --out instead of --resume"
            ),
        ));
    }
    let mut tensors = HashMap::new();
    for file in [TRAINABLE_FILE, OPTIMIZER_FILE] {
        let p = dir.join(file);
        let t =
            candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| bad(&p, e.to_string()))?;
        tensors.extend(t);
    }
    Ok((state, tensors))
}

/// Puts a loaded checkpoint's tensors into the parameters and the optimiser.
pub fn restore(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    params: &ParamSet,
    opt: &mut AdamW,
    step: u64,
) -> Result<(), TrainError> {
    let get = |name: &str, like: &Tensor| -> Result<Tensor, TrainError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(path, format!("missing tensor `{name}`")))?;
        if t.shape() != like.shape() {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                ),
            ));
        }
        Ok(t.clone())
    };
    for ((name, var), m) in params.trainable().zip(opt.moments.iter_mut()) {
        var.set(&get(name, var.as_tensor())?)?;
        *m = Moments {
            exp_avg: get(&format!("exp_avg.{name}"), var.as_tensor())?,
            exp_avg_sq: get(&format!("exp_avg_sq.{name}"), var.as_tensor())?,
        };
    }
    opt.step = step;
    Ok(())
}
