//! The training configuration: the project's YAML (`config/on_device_full_ft.yaml`,
//! `config/low_memory.yaml`) and RoboVLMs' JSON configs, read into one typed [`TrainConfig`].
//!
//! Both use RoboVLMs' key layout (top-level hyper-parameters, `train_setup`, `trainer`,
//! `act_head`), so a RoboVLMs JSON config is accepted as it is. Keys the trainer uses are honoured;
//! every other key is listed once in [`TrainConfig::ignored`]. A missing required key or a value of
//! the wrong type is an error naming the key. Required are the keys RoboVLMs itself indexes without
//! a default (`batch_size`, `learning_rate`, `min_lr_scale`, `weight_decay`, `trainer.max_epochs`,
//! `train_setup.freeze_backbone`, `train_setup.lora_enable`, and the `lora_*` keys when LoRA is on);
//! the others default as RoboVLMs' `.get(key, default)` or Lightning's `Trainer` do.
//! One file over the usual size on purpose: every key's reading, default and error sit together.

use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read training config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("training config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("training config {path}: {msg}")]
    Key { path: PathBuf, msg: String },
}

/// RoboVLMs' `scheduler` names (`robovlms/train/base_trainer.py`, `configure_optimizers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// Linear warmup, then constant (transformers' `get_constant_schedule_with_warmup`).
    Constant,
    /// Linear warmup, then a half cosine down to `min_lr_scale × lr` (RoboVLMs' `adjust_learning_rate`).
    HalfCosine,
    /// Linear warmup, then a half cosine down to 0 (transformers' `get_cosine_schedule_with_warmup`).
    Cosine,
}

/// Lightning's `precision` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    #[serde(rename = "32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "16-mixed")]
    F16Mixed,
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
}

impl Precision {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "32" | "32-true" | "fp32" => Self::F32,
            "bf16" | "bf16-true" => Self::Bf16,
            "16" | "16-mixed" | "fp16" => Self::F16Mixed,
            "bf16-mixed" => Self::Bf16Mixed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "32",
            Self::Bf16 => "bf16",
            Self::F16Mixed => "16-mixed",
            Self::Bf16Mixed => "bf16-mixed",
        }
    }
}

/// Where `gradient_clip_val` was found. RoboVLMs' `main.py` passes only the top-level key to
/// Lightning (overwriting `trainer.gradient_clip_val`), while its configs set the one under `trainer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ClipSource {
    TopLevel,
    Trainer,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GradientClip {
    pub max_norm: f64,
    pub source: ClipSource,
}

/// peft `LoraConfig` settings (`train_setup.lora_*`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraSetup {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// `none`, `all` or `lora_only`.
    pub bias: String,
}

/// `train_setup`: what trains (RoboVLMs `_trainable_params_setup`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainSetup {
    pub freeze_backbone: bool,
    /// -1 = the whole VLM (when not frozen); otherwise Python's `layers[-n:]`.
    pub train_decoder_layers: i64,
    pub train_vision: bool,
    pub train_text_embedding: bool,
    /// Only matters with `use_vision_resampler` (never for Kosmos-2, whose `image_to_text_projection`
    /// is part of the VLM).
    pub freeze_resampler: bool,
    pub lora: Option<LoraSetup>,
    pub gradient_checkpointing: bool,
}

impl TrainSetup {
    /// A setup by the four switches RoboVLMs' `_trainable_params_setup` reads, with the resampler
    /// frozen, no LoRA and no checkpointing; `TrainSetup::layers(true, -1, false, false)` trains
    /// the head alone.
    pub fn layers(
        freeze_backbone: bool,
        train_decoder_layers: i64,
        train_vision: bool,
        train_text_embedding: bool,
    ) -> Self {
        Self {
            freeze_backbone,
            train_decoder_layers,
            train_vision,
            train_text_embedding,
            freeze_resampler: true,
            lora: None,
            gradient_checkpointing: false,
        }
    }
}

/// Sizes a config may state about the model; checked against the model directory, which owns them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ModelClaims {
    pub fwd_pred_next_n: Option<usize>,
    pub action_dim: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    /// `(norm_min, norm_max)` when `norm_action` is true.
    pub norm: Option<(f64, f64)>,
}

/// Everything the trainer reads from a config.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub learning_rate: f64,
    pub min_lr_scale: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub warmup_steps: f64,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    pub arm_gripper_loss_ratio: f64,
    pub gradient_clip: Option<GradientClip>,
    /// Training window (the model directory's when absent).
    pub window_size: Option<usize>,
    pub model: ModelClaims,
    pub max_epochs: usize,
    /// `None` for Lightning's -1.
    pub max_steps: Option<usize>,
    pub accumulate_grad_batches: usize,
    pub precision: Precision,
    pub train_setup: TrainSetup,
    /// Fraction of episodes held out for validation (ours; RoboVLMs uses a separate folder).
    pub val_fraction: f64,
    /// Also checkpoint every N optimiser steps (0 = only at epoch ends).
    pub checkpoint_every_n_steps: usize,
    /// Keys present in the file that the trainer does not use.
    pub ignored: Vec<String>,
}

impl TrainConfig {
    /// Reads a `.json` (RoboVLMs, `parent` chain merged) or `.yaml`/`.yml` file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let is_json = path.extension().is_some_and(|e| e == "json");
        let value = if is_json {
            crate::model::robovlms::config::read_config(path).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                msg: e.to_string(),
            })?
        } else {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.to_owned(),
                source,
            })?;
            serde_yaml::from_str::<Value>(&text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                msg: e.to_string(),
            })?
        };
        Self::from_value(&value).map_err(|msg| ConfigError::Key {
            path: path.to_owned(),
            msg,
        })
    }

    /// Reads a parsed config; the error names the key.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        if !value.is_object() {
            return Err("the top level must be a mapping of keys".into());
        }
        let r = Reader::new(value);
        r.mark("parent");
        let lora = if r.bool_req("train_setup.lora_enable")? {
            Some(LoraSetup {
                r: r.usize_req("train_setup.lora_r")?,
                alpha: r.f64_req("train_setup.lora_alpha")?,
                dropout: r.f64_req("train_setup.lora_dropout")?,
                bias: r.choice(
                    "train_setup.lora_bias",
                    &["none", "all", "lora_only"],
                    "none",
                )?,
            })
        } else {
            None
        };
        let train_setup = TrainSetup {
            freeze_backbone: r.bool_req("train_setup.freeze_backbone")?,
            train_decoder_layers: r.i64_or("train_setup.train_decoder_layers", -1)?,
            train_vision: r.bool_or("train_setup.train_vision", false)?,
            train_text_embedding: r.bool_or("train_setup.train_text_embedding", false)?,
            freeze_resampler: r.bool_or("train_setup.freeze_resampler", false)?,
            lora,
            gradient_checkpointing: r.bool_or("train_setup.gradient_checkpointing", false)?,
        };
        if r.bool_or("use_vision_resampler", false)? {
            return Err("`use_vision_resampler` is true; only Kosmos-2's own \
                        image_to_text_projection is supported (set it to false)"
                .into());
        }
        let gradient_clip = match (
            r.f64_opt("gradient_clip_val")?,
            r.f64_opt("trainer.gradient_clip_val")?,
        ) {
            (Some(v), _) => Some((v, ClipSource::TopLevel)),
            (None, Some(v)) => Some((v, ClipSource::Trainer)),
            (None, None) => None,
        }
        .filter(|(v, _)| *v > 0.0)
        .map(|(max_norm, source)| GradientClip { max_norm, source });
        let scheduler = match r.str_opt("scheduler")?.as_deref().unwrap_or("constant") {
            "constant" => SchedulerKind::Constant,
            "half-cosine" => SchedulerKind::HalfCosine,
            "cosine" => SchedulerKind::Cosine,
            other => {
                return Err(format!(
                    "`scheduler` is `{other}`; RoboVLMs knows constant, half-cosine and cosine"
                ))
            }
        };
        let precision = match r.get("trainer.precision") {
            None => Precision::F32,
            Some(v) => {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err(format!("`trainer.precision` must be a string, got {v}")),
                };
                Precision::parse(&s).ok_or_else(|| {
                    format!(
                        "`trainer.precision` is `{s}`; supported: 32, bf16, 16-mixed, bf16-mixed"
                    )
                })?
            }
        };
        let max_steps = match r.i64_or("trainer.max_steps", -1)? {
            -1 => None,
            n if n > 0 => Some(n as usize),
            n => return Err(format!("`trainer.max_steps` must be -1 or ≥ 1, got {n}")),
        };
        let norm = if r.bool_or("norm_action", false)? {
            Some((r.f64_or("norm_min", -1.0)?, r.f64_or("norm_max", 1.0)?))
        } else {
            None
        };
        let cfg = Self {
            batch_size: r.usize_req("batch_size")?,
            learning_rate: r.f64_req("learning_rate")?,
            min_lr_scale: r.f64_req("min_lr_scale")?,
            weight_decay: r.f64_req("weight_decay")?,
            warmup_epochs: r.f64_or("warmup_epochs", 0.0)?,
            warmup_steps: r.f64_or("warmup_steps", 0.0)?,
            scheduler,
            seed: r.usize_or("seed", 42)? as u64,
            arm_gripper_loss_ratio: r.f64_or("arm_gripper_loss_ratio", 0.01)?,
            gradient_clip,
            window_size: r.usize_opt("window_size")?,
            model: ModelClaims {
                fwd_pred_next_n: r.usize_opt("fwd_pred_next_n")?,
                action_dim: r.usize_opt("act_head.action_dim")?,
                hidden_size: r.usize_opt("act_head.hidden_size")?,
                num_layers: r.usize_opt("act_head.num_layers")?,
                norm,
            },
            max_epochs: r.usize_req("trainer.max_epochs")?,
            max_steps,
            accumulate_grad_batches: r.usize_or("trainer.accumulate_grad_batches", 1)?,
            precision,
            train_setup,
            val_fraction: r.f64_or("val_fraction", 0.1)?,
            checkpoint_every_n_steps: r.usize_or("checkpoint_every_n_steps", 0)?,
            ignored: Vec::new(),
        };
        cfg.check()?;
        Ok(Self {
            ignored: r.unused(),
            ..cfg
        })
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("batch_size", self.batch_size),
            ("trainer.max_epochs", self.max_epochs),
            (
                "trainer.accumulate_grad_batches",
                self.accumulate_grad_batches,
            ),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{k}` must be ≥ 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "`learning_rate` must be > 0, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(format!(
                "`val_fraction` must be in [0, 1), got {}",
                self.val_fraction
            ));
        }
        if self.window_size == Some(0) {
            return Err("`window_size` must be ≥ 1".into());
        }
        if let Some(l) = &self.train_setup.lora {
            if l.r == 0 {
                return Err("`train_setup.lora_r` must be ≥ 1".into());
            }
        }
        Ok(())
    }

    /// The equivalent RoboVLMs JSON config (`train --print-robovlms-config`), the way out to a GPU
    /// cluster: every setting this trainer reads, at the key RoboVLMs reads it from, with
    /// `train_setup` as resolved by the strategy (`setup`) and the model's claims (`model`:
    /// `fwd_pred_next_n`, `act_head`, normalisation). `gradient_clip_val` goes both at the top
    /// level (where RoboVLMs' `main.py` reads it) and under `trainer` (where its configs put it), so
    /// an upstream run clips as this one does. Reading the result back gives the same settings.
    pub fn to_robovlms_json(&self, setup: &TrainSetup, model: &ModelClaims) -> Value {
        let clip = self.gradient_clip.map(|c| c.max_norm);
        let mut train_setup = serde_json::json!({
            "freeze_backbone": setup.freeze_backbone,
            "train_decoder_layers": setup.train_decoder_layers,
            "train_vision": setup.train_vision,
            "train_text_embedding": setup.train_text_embedding,
            "freeze_resampler": setup.freeze_resampler,
            "gradient_checkpointing": setup.gradient_checkpointing,
            "lora_enable": setup.lora.is_some(),
        });
        if let Some(l) = &setup.lora {
            for (k, v) in [
                ("lora_r", Value::from(l.r)),
                ("lora_alpha", Value::from(l.alpha)),
                ("lora_dropout", Value::from(l.dropout)),
                ("lora_bias", Value::from(l.bias.clone())),
            ] {
                train_setup[k] = v;
            }
        }
        let scheduler = match self.scheduler {
            SchedulerKind::Constant => "constant",
            SchedulerKind::HalfCosine => "half-cosine",
            SchedulerKind::Cosine => "cosine",
        };
        let mut act_head = serde_json::json!({"type": "LSTMDecoder"});
        for (k, v) in [
            ("action_dim", model.action_dim),
            ("hidden_size", model.hidden_size),
            ("num_layers", model.num_layers),
        ] {
            if let Some(v) = v {
                act_head[k] = v.into();
            }
        }
        let mut out = serde_json::json!({
            "robovlm_name": "RoboKosMos",
            "model": "kosmos",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "min_lr_scale": self.min_lr_scale,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "warmup_steps": self.warmup_steps,
            "scheduler": scheduler,
            "arm_gripper_loss_ratio": self.arm_gripper_loss_ratio,
            "gradient_clip_val": clip,
            "window_size": self.window_size,
            "fwd_pred_next_n": model.fwd_pred_next_n,
            "use_vision_resampler": false,
            "norm_action": model.norm.is_some(),
            "val_fraction": self.val_fraction,
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "train_setup": train_setup,
            "act_head": act_head,
            "trainer": {
                "precision": self.precision.name(),
                "max_epochs": self.max_epochs,
                "max_steps": self.max_steps.map_or(-1, |m| m as i64),
                "accumulate_grad_batches": self.accumulate_grad_batches,
                "gradient_clip_val": clip,
            },
        });
        if let Some((lo, hi)) = model.norm {
            out["norm_min"] = lo.into();
            out["norm_max"] = hi.into();
        }
        out
    }

    /// Where `gradient_clip_val` came from, for the log.
    pub fn clip_description(&self) -> String {
        match self.gradient_clip {
            None => "no gradient clipping (gradient_clip_val unset or 0)".into(),
            Some(GradientClip { max_norm, source: ClipSource::TopLevel }) => {
                format!("clipping the global gradient norm to {max_norm} (top-level gradient_clip_val, as RoboVLMs' main.py reads it)")
            }
            Some(GradientClip { max_norm, source: ClipSource::Trainer }) => format!(
                "clipping the global gradient norm to {max_norm} (trainer.gradient_clip_val; \
                 note: RoboVLMs' main.py ignores this key, so an upstream run of this config does not clip)"
            ),
        }
    }
}

/// Typed reads of dotted keys that remember which keys were read.
struct Reader<'a> {
    root: &'a Value,
    used: RefCell<BTreeSet<String>>,
}

impl<'a> Reader<'a> {
    fn new(root: &'a Value) -> Self {
        Self {
            root,
            used: RefCell::default(),
        }
    }

    fn mark(&self, key: &str) {
        self.used.borrow_mut().insert(key.to_owned());
    }

    /// The value at `key`; YAML/JSON `null` counts as absent (RoboVLMs writes `null` for unset).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.mark(key);
        key.split('.')
            .try_fold(self.root, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, String> {
        self.get(key)
            .map(|v| f(v).ok_or_else(|| format!("`{key}` must be {what}, got {v}")))
            .transpose()
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T, String> {
        v.ok_or_else(|| format!("`{key}` is missing"))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, String> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().map(|n| n as usize)
        })
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, String> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }
    fn usize_req(&self, key: &str) -> Result<usize, String> {
        let v = self.usize_opt(key)?;
        self.required(key, v)
    }
    fn i64_or(&self, key: &str, default: i64) -> Result<i64, String> {
        Ok(self
            .typed(key, "an integer", Value::as_i64)?
            .unwrap_or(default))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>, String> {
        // YAML reads `2e-5` (no dot) as a string; accept numeric strings like PyYAML users expect.
        self.typed(key, "a number", |v| {
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
                .filter(|x| x.is_finite())
        })
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, String> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }
    fn f64_req(&self, key: &str) -> Result<f64, String> {
        let v = self.f64_opt(key)?;
        self.required(key, v)
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>, String> {
        self.typed(key, "true or false", Value::as_bool)
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        Ok(self.bool_opt(key)?.unwrap_or(default))
    }
    fn bool_req(&self, key: &str) -> Result<bool, String> {
        let v = self.bool_opt(key)?;
        self.required(key, v)
    }
    fn str_opt(&self, key: &str) -> Result<Option<String>, String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_owned))
    }
    fn choice(&self, key: &str, allowed: &[&str], default: &str) -> Result<String, String> {
        let v = self.str_opt(key)?.unwrap_or_else(|| default.to_owned());
        if allowed.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(format!("`{key}` is `{v}`; supported: {allowed:?}"))
        }
    }

    /// Leaf keys of the document that were never read, dotted.
    fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut out = Vec::new();
        collect_unused(self.root, "", &used, &mut out);
        out.sort();
        out
    }
}

fn collect_unused(v: &Value, prefix: &str, used: &BTreeSet<String>, out: &mut Vec<String>) {
    match v {
        Value::Object(map) if !used.contains(prefix) => {
            for (k, child) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_unused(child, &key, used, out);
            }
        }
        _ if !used.contains(prefix) && !prefix.is_empty() => out.push(prefix.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "batch_size": 2, "learning_rate": 2e-5, "min_lr_scale": 0.01, "weight_decay": 0,
            "trainer": {"max_epochs": 5},
            "train_setup": {"freeze_backbone": false, "lora_enable": false}
        })
    }

    #[test]
    fn defaults_follow_robovlms_get_calls() {
        let c = TrainConfig::from_value(&minimal()).unwrap();
        assert_eq!(c.scheduler, SchedulerKind::Constant);
        assert_eq!(c.train_setup.train_decoder_layers, -1);
        assert!(!c.train_setup.train_vision && !c.train_setup.train_text_embedding);
        assert_eq!(c.arm_gripper_loss_ratio, 0.01);
        assert_eq!((c.accumulate_grad_batches, c.max_steps), (1, None));
        assert!(c.gradient_clip.is_none() && c.ignored.is_empty());
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let mut v = minimal();
        v["trainer"].as_object_mut().unwrap().remove("max_epochs");
        let e = TrainConfig::from_value(&v).unwrap_err();
        assert!(e.contains("`trainer.max_epochs` is missing"), "{e}");
        let mut v = minimal();
        v["train_setup"]["freeze_backbone"] = json!("no");
        let e = TrainConfig::from_value(&v).unwrap_err();
        assert!(
            e.contains("`train_setup.freeze_backbone` must be true or false"),
            "{e}"
        );
        let mut v = minimal();
        v["train_setup"]["lora_enable"] = json!(true);
        let e = TrainConfig::from_value(&v).unwrap_err();
        assert!(e.contains("`train_setup.lora_r` is missing"), "{e}");
    }

    #[test]
    fn clip_value_is_found_in_either_place_top_level_first() {
        let mut v = minimal();
        v["trainer"]["gradient_clip_val"] = json!(1.0);
        let c = TrainConfig::from_value(&v).unwrap();
        assert_eq!(c.gradient_clip.unwrap().source, ClipSource::Trainer);
        v["gradient_clip_val"] = json!(0.5);
        let c = TrainConfig::from_value(&v).unwrap();
        assert_eq!(
            c.gradient_clip,
            Some(GradientClip {
                max_norm: 0.5,
                source: ClipSource::TopLevel
            })
        );
    }

    #[test]
    fn shipped_configs_are_the_seeds_6_1_and_6_2() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let full = TrainConfig::from_file(&dir.join("on_device_full_ft.yaml")).unwrap();
        assert_eq!(
            (
                full.batch_size,
                full.accumulate_grad_batches,
                full.max_epochs
            ),
            (2, 4, 5)
        );
        assert_eq!(
            (full.learning_rate, full.precision),
            (2e-5, Precision::F16Mixed)
        );
        assert_eq!(full.gradient_clip.map(|c| c.max_norm), Some(1.0));
        let s = &full.train_setup;
        assert!(!s.freeze_backbone && s.train_vision && s.train_text_embedding && s.lora.is_none());
        assert!(full.ignored.is_empty(), "{:?}", full.ignored);
        let low = TrainConfig::from_file(&dir.join("low_memory.yaml")).unwrap();
        let s = &low.train_setup;
        assert!(s.freeze_backbone && !s.train_vision && s.train_decoder_layers == 2);
        let lora = s.lora.as_ref().unwrap();
        assert_eq!((lora.r, lora.alpha, lora.dropout), (32, 16.0, 0.1));
    }

    #[test]
    fn robovlms_calvin_config_is_accepted_as_is() {
        // The keys of RoboVLMs' CALVIN KosMos config that matter here, plus some it has that we ignore.
        let v = json!({
            "parent": null, "seq_len": 1, "window_size": 8, "fwd_pred_next_n": 10,
            "arm_gripper_loss_ratio": 0.01, "seed": 123, "batch_size": 41, "learning_rate": 2e-5,
            "min_lr_scale": 1e-2, "weight_decay": 0, "warmup_epochs": 0.25, "warmup_steps": 0,
            "warmup_ratio": null, "use_vision_resampler": false, "norm_action": true,
            "norm_min": -0.65, "norm_max": 0.65,
            "train_setup": {"precision": "bf16", "train_vision": true, "freeze_backbone": false,
                            "freeze_resampler": false, "lora_enable": false, "train_text_embedding": true,
                            "gradient_checkpointing": false, "lora_r": 64},
            "act_head": {"type": "LSTMDecoder", "hidden_size": 1024, "action_dim": 7},
            "trainer": {"strategy": "deepspeed_stage_2", "precision": "16", "gradient_clip_val": 1.0,
                        "max_epochs": 5, "max_steps": -1, "accumulate_grad_batches": 1}
        });
        let c = TrainConfig::from_value(&v).unwrap();
        assert_eq!(
            (c.warmup_epochs, c.seed, c.window_size),
            (0.25, 123, Some(8))
        );
        assert_eq!(c.model.norm, Some((-0.65, 0.65)));
        assert_eq!(c.gradient_clip.unwrap().source, ClipSource::Trainer);
        assert!(
            c.ignored.contains(&"train_setup.lora_r".to_string()),
            "{:?}",
            c.ignored
        );
        assert!(c.ignored.contains(&"act_head.type".to_string()));
    }

    #[test]
    fn robovlms_json_reads_back_as_the_same_settings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for file in ["on_device_full_ft.yaml", "low_memory.yaml"] {
            let mut c = TrainConfig::from_file(&dir.join(file)).unwrap();
            c.model = ModelClaims {
                fwd_pred_next_n: Some(2),
                action_dim: Some(3),
                hidden_size: Some(1024),
                num_layers: Some(4),
                norm: Some((-1.0, 1.0)),
            };
            c.max_steps = Some(100);
            let json = c.to_robovlms_json(&c.train_setup, &c.model);
            let back = TrainConfig::from_value(&json).unwrap();
            assert_eq!(
                back.ignored,
                ["act_head.type", "model", "robovlm_name"],
                "{file}"
            );
            assert_eq!(
                back.gradient_clip.map(|g| g.source),
                Some(ClipSource::TopLevel),
                "{file}: upstream main.py must see the clip value"
            );
            let same = TrainConfig {
                ignored: vec![],
                gradient_clip: c.gradient_clip.map(|g| GradientClip {
                    source: ClipSource::TopLevel,
                    ..g
                }),
                ..c
            };
            assert_eq!(
                TrainConfig {
                    ignored: vec![],
                    ..back
                },
                same,
                "{file}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_listed_once() {
        let mut v = minimal();
        v["num_workers"] = json!(16);
        v["trainer"]["strategy"] = json!("deepspeed_stage_2");
        v["vlm"] = json!({"type": "AutoModelForVision2Seq", "name": "kosmos"});
        let c = TrainConfig::from_value(&v).unwrap();
        assert_eq!(
            c.ignored,
            ["num_workers", "trainer.strategy", "vlm.name", "vlm.type"]
        );
    }
}
