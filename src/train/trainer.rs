//! The training loop: RoboVLMs' training step (every frame of a window through the VLM, the LSTM
//! over the window's `[ACT]` features from a zero state, masked chunk targets), Lightning's
//! gradient accumulation (each batch's loss divided by `accumulate_grad_batches`; an epoch's last,
//! partial group still steps), clipping, AdamW and the per-step schedule; validation each epoch,
//! `metrics.jsonl`, run checkpoints, and the trained model directory `<out>/model`.
//! One file over the usual size on purpose: the loop (set-up, resume, steps, validation, saves)
//! is one sequence; accumulation and metrics live in their own modules.

use super::accumulate::Accumulator;
use super::lora;
use super::loss::{action_loss, Batch};
use super::metrics::{truncate_lines, Metrics};
use super::optim::{AdamW, Schedule};
use super::params::{ModelFiles, ParamSet};
use super::plan::{self, ModelSizes, Workload};
use super::state::{self, Fingerprint, RunState};
use super::strategy::Strategy;
use super::TrainError;
use crate::config::train::{LoraSetup, Precision};
use crate::config::TrainConfig;
use crate::data::dataset::{DatasetConfig, MobileVlaDataset};
use crate::fsutil::write_atomic;
use crate::model::model_dir::{self, publish_model_dir};
use crate::model::{Policy, PolicyConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const MODEL_DIR: &str = "model";
pub const LOSS_PLOT: &str = "loss.png";

/// What to train on, from where, into where.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub config: TrainConfig,
    /// Episodes folder (`*.h5`).
    pub data: PathBuf,
    /// Model directory to start from (`mobile_vla model init` / `model import`).
    pub model: PathBuf,
    /// Run folder: checkpoints, metrics, and the trained `model/`.
    pub out: PathBuf,
    /// Continue from `<out>/checkpoint.json`.
    pub resume: bool,
    /// Overrides `trainer.max_steps`.
    pub max_steps: Option<usize>,
    pub strategy: Strategy,
    /// Memory `--strategy auto` must fit in (default: available memory + what this process
    /// already holds).
    pub budget: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Loading,
    Training,
    Validating,
    Saving,
}

/// One progress report (the `--progress json` line without its `event` key).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub epoch: usize,
    pub epochs: usize,
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub eta_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done {
        model_dir: PathBuf,
        checkpoint: PathBuf,
        metrics: PathBuf,
        final_loss: f64,
        best_val_loss: Option<f64>,
    },
    /// Cancelled (flag set); a checkpoint at the last optimiser step was saved.
    Cancelled { checkpoint: PathBuf },
}

/// A prepared run: model with its trainable parameters, data, optimiser, schedule.
pub struct Trainer {
    opts: TrainOptions,
    policy: Policy,
    params: ParamSet,
    policy_cfg: PolicyConfig,
    /// LoRA settings when adapters train (merged into the weights of `<out>/model`).
    lora: Option<LoraSetup>,
    train: MobileVlaDataset,
    val: MobileVlaDataset,
    opt: AdamW,
    schedule: Schedule,
    total_steps: u64,
    fingerprint: Fingerprint,
    /// Resolved settings, for the log and the first metrics line.
    summary: serde_json::Value,
    table: String,
    prompts: HashMap<String, Vec<u32>>,
}

pub(super) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The model directory owns the architecture: a config that states another one is an error.
fn check_claims(cfg: &TrainConfig, p: &PolicyConfig, dir: &Path) -> Result<(), TrainError> {
    let m = &cfg.model;
    let norm = p.action.norm.map(|n| (n.min as f64, n.max as f64));
    let claims: [(&'static str, Option<String>, String); 5] = [
        (
            "fwd_pred_next_n",
            m.fwd_pred_next_n.map(|v| v.to_string()),
            p.fwd_pred_next_n.to_string(),
        ),
        (
            "act_head.action_dim",
            m.action_dim.map(|v| v.to_string()),
            p.action.dim.to_string(),
        ),
        (
            "act_head.hidden_size",
            m.hidden_size.map(|v| v.to_string()),
            p.head.hidden_size.to_string(),
        ),
        (
            "act_head.num_layers",
            m.num_layers.map(|v| v.to_string()),
            p.head.num_layers.to_string(),
        ),
        (
            "norm_min/norm_max",
            m.norm.map(|(a, b)| format!("[{a}, {b}]")),
            norm.map_or("no normalisation".into(), |(a, b)| format!("[{a}, {b}]")),
        ),
    ];
    for (key, config, model) in claims {
        let differs = match (key, &config) {
            // f32 in policy.json vs f64 in the config: compare as f32.
            ("norm_min/norm_max", Some(_)) => {
                m.norm.map(|(a, b)| (a as f32, b as f32)) != p.action.norm.map(|n| (n.min, n.max))
            }
            (_, Some(c)) => *c != model,
            (_, None) => false,
        };
        if differs {
            return Err(TrainError::Mismatch {
                key,
                config: config.unwrap_or_default(),
                model,
                model_dir: dir.to_owned(),
            });
        }
    }
    Ok(())
}

fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64;
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mixed));
    order
}

impl Trainer {
    /// Loads the model, resolves the strategy and the trainable parameters, opens and splits the
    /// episodes. Logs the trainable-parameter table and every setting that differs from the request.
    pub fn new(mut opts: TrainOptions) -> Result<Self, TrainError> {
        if let Some(m) = opts.max_steps {
            opts.config.max_steps = Some(m);
        }
        let cfg = &opts.config;
        let dir = &opts.model;
        let mut policy_cfg = PolicyConfig::from_file(&dir.join(model_dir::POLICY_FILE))?;
        check_claims(cfg, &policy_cfg, dir)?;
        if let Some(w) = cfg.window_size {
            policy_cfg.window_size = w;
        }
        let files = ModelFiles::read(dir)?;
        let dropout = files.backbone.text_config.dropout;
        let (strategy, setup, why) = match opts.strategy {
            Strategy::Auto => {
                let work = Workload {
                    batch: cfg.batch_size,
                    window: policy_cfg.window_size,
                    prompt_tokens: plan::PROMPT_TOKENS,
                    accumulate: cfg.accumulate_grad_batches,
                };
                let sizes = ModelSizes {
                    groups: files.group_sizes(),
                    head: policy_cfg.head,
                    // Already loaded: what loading cost is in the resident memory below.
                    file_bytes: 0,
                };
                // The weights are loaded already, so they count on both sides.
                let budget = opts.budget.unwrap_or_else(|| {
                    plan::available_memory().unwrap_or(u64::MAX)
                        + plan::resident_memory().unwrap_or(0)
                });
                let p = plan::plan(cfg, &files.backbone, &sizes, work, budget);
                tracing::info!("memory plan:\n{}", p.table());
                let rung = p.chosen()?.rung;
                (rung.strategy(), rung.setup(&cfg.train_setup), p.reason())
            }
            s => (s, s.setup(&cfg.train_setup), format!("--strategy {s:?}")),
        };
        tracing::info!("strategy {strategy:?} ({why})");
        let (policy, params) = files.build(policy_cfg.clone(), &setup, true, cfg.seed)?;
        let table = params.table();
        tracing::info!("trainable parameters ({strategy:?}):\n{table}");

        // Honest notes on what runs.
        let precision_run = Precision::F32;
        if let Some(note) = plan::precision_note(cfg.precision) {
            tracing::warn!("{note}");
        }
        if setup.gradient_checkpointing {
            tracing::info!(
                "gradient checkpointing: each transformer layer's input is kept and the layer \
                 recomputed in the backward (less activation memory, about one more forward of time)"
            );
        }
        policy
            .backbone()
            .train_mode()
            .set_checkpointing(setup.gradient_checkpointing);
        tracing::info!("train-mode dropout {dropout} (the backbone config's; off for validation)");
        tracing::info!("{}", cfg.clip_description());
        if !cfg.ignored.is_empty() {
            tracing::info!(
                "config keys ignored by this trainer: {}",
                cfg.ignored.join(", ")
            );
        }

        // Data.
        let data_cfg = DatasetConfig {
            window_size: policy_cfg.window_size,
            fwd_pred_next_n: policy_cfg.fwd_pred_next_n,
            left_pad: false,
            val_fraction: cfg.val_fraction,
            seed: cfg.seed,
            read: Default::default(),
            // A corrupt episode is logged and skipped; the rest trains.
            strict: false,
        };
        let all = MobileVlaDataset::open(&opts.data, data_cfg)?;
        let data: Vec<(String, u64)> = all
            .episodes()
            .iter()
            .map(|e| {
                let p = e.path();
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            })
            .collect();
        let (train, val) = all.split();
        if train.is_empty() {
            return Err(TrainError::NoWindows {
                dir: opts.data.clone(),
                window: policy_cfg.window_size,
                longest: train.episodes().iter().map(|e| e.len()).max().unwrap_or(0),
            });
        }
        tracing::info!(
            "{} training windows from {} episodes, {} validation windows from {} episodes",
            train.len(),
            train.episodes().len(),
            val.len(),
            val.episodes().len()
        );

        // Optimiser and schedule (RoboVLMs' configure_optimizers over Lightning's step count).
        let vars: Vec<_> = params.trainable().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(&vars, cfg.weight_decay)?;
        let n_batches = train.len().div_ceil(cfg.batch_size);
        let steps_per_epoch = n_batches.div_ceil(cfg.accumulate_grad_batches);
        let schedule = Schedule::new(
            cfg.scheduler,
            steps_per_epoch,
            cfg.max_epochs,
            cfg.max_steps,
            cfg.warmup_epochs,
            cfg.warmup_steps,
            cfg.min_lr_scale,
        );
        let full = (steps_per_epoch * cfg.max_epochs) as u64;
        let total_steps = cfg.max_steps.map_or(full, |m| full.min(m as u64));

        let config_json = serde_json::to_value(cfg).unwrap_or_default();
        let fingerprint = Fingerprint {
            config: config_json,
            model_dir: std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
            data,
            trainable: params.trainable().map(|(n, _)| n.to_owned()).collect(),
        };
        let summary = serde_json::json!({
            "event": "start",
            "strategy": strategy,
            "strategy_reason": why,
            "precision_requested": cfg.precision.name(),
            "precision_run": precision_run.name(),
            "gradient_checkpointing": setup.gradient_checkpointing,
            "lora": setup.lora,
            "dropout": dropout,
            "gradient_clip": cfg.gradient_clip,
            "trainable_params": params.num_trainable(),
            "total_params": params.num_total(),
            "train_windows": train.len(),
            "val_windows": val.len(),
            "window_size": policy_cfg.window_size,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        });
        Ok(Self {
            opts,
            policy,
            params,
            policy_cfg,
            lora: setup.lora,
            train,
            val,
            opt,
            schedule,
            total_steps,
            fingerprint,
            summary,
            table,
            prompts: HashMap::new(),
        })
    }

    /// The trainable-parameter table (group → trainable? → params).
    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn load_batch(&mut self, indices: &[usize], val: bool) -> Result<Batch, TrainError> {
        let data = if val { &self.val } else { &self.train };
        let samples = indices
            .iter()
            .map(|&i| data.get(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::new(&self.policy, &samples, &mut self.prompts)?)
    }

    fn validate(&mut self, report: &mut dyn FnMut(Phase, f64)) -> Result<Option<f64>, TrainError> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let bs = self.opts.config.batch_size;
        let n = self.val.len();
        let mut sum = 0.0;
        self.policy.backbone().train_mode().disable();
        let batches: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(bs)
            .map(<[usize]>::to_vec)
            .collect();
        for idx in &batches {
            let batch = self.load_batch(idx, true)?;
            let out = self
                .policy
                .forward_window(&batch.pixel_values, &batch.token_ids)?;
            let loss = action_loss(&out, &batch, self.opts.config.arm_gripper_loss_ratio)?;
            let v = loss.total.to_scalar::<f32>()? as f64;
            sum += v;
            report(Phase::Validating, v);
        }
        Ok(Some(sum / batches.len() as f64))
    }

    /// Runs (or resumes) the run to its end or until `cancel` is set. `progress` is called after
    /// every batch and phase change.
    pub fn run(
        &mut self,
        progress: &mut dyn FnMut(&Progress),
        cancel: &AtomicBool,
    ) -> Result<Outcome, TrainError> {
        let out = self.opts.out.clone();
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let metrics_path = out.join(METRICS_FILE);
        let existing = state::latest(&out)?;
        let mut pos = match (self.opts.resume, existing) {
            (false, Some(_)) => return Err(TrainError::RunExists { path: out }),
            (true, None) => return Err(TrainError::NothingToResume { path: out }),
            (true, Some(ckpt)) => {
                let (st, tensors) = state::load(&ckpt, &self.fingerprint)?;
                state::restore(&ckpt, &tensors, &self.params, &mut self.opt, st.step)?;
                truncate_lines(&metrics_path, st.metrics_lines)?;
                tracing::info!(
                    "resuming {} at step {}, epoch {}, batch {}",
                    ckpt.display(),
                    st.step,
                    st.epoch,
                    st.batch
                );
                st
            }
            (false, None) => {
                write_atomic(&metrics_path, |p| std::fs::write(p, b""))
                    .map_err(io_err(&metrics_path))?;
                RunState {
                    format: state::FORMAT.into(),
                    fingerprint: self.fingerprint.clone(),
                    step: 0,
                    epoch: 0,
                    batch: 0,
                    order: epoch_order(self.opts.config.seed, 0, self.train.len()),
                    metrics_lines: 0,
                    last_loss: None,
                    best_val_loss: None,
                }
            }
        };
        let mut metrics = Metrics::open(&metrics_path, pos.metrics_lines)?;
        metrics.write(&self.summary)?;

        let cfg = self.opts.config.clone();
        let (bs, accum, epochs) = (cfg.batch_size, cfg.accumulate_grad_batches, cfg.max_epochs);
        let n_batches = self.train.len().div_ceil(bs);
        let started = Instant::now();
        let total_steps = self.total_steps;
        let (start_step, mut samples_done) = (pos.step, 0usize);
        let mut last_ckpt = state::latest(&out)?;
        let mut report = |phase: Phase, pos: &RunState, loss: f64, lr: f64, samples: usize| {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            let steps = (pos.step - start_step) as f64;
            let remaining = total_steps.saturating_sub(pos.step) as f64;
            progress(&Progress {
                phase,
                epoch: pos.epoch,
                epochs,
                step: pos.step,
                total_steps,
                loss,
                lr,
                samples_per_s: samples as f64 / secs,
                eta_s: if steps > 0.0 {
                    remaining * secs / steps
                } else {
                    0.0
                },
            })
        };
        let mut lr = cfg.learning_rate * self.schedule.factor(pos.step);
        let loss_now = |p: &RunState| p.last_loss.unwrap_or(f64::NAN);
        report(Phase::Training, &pos, loss_now(&pos), lr, 0);

        let trainable: Vec<_> = self.params.trainable().map(|(_, v)| v.clone()).collect();
        while pos.epoch < epochs && pos.step < total_steps {
            while pos.batch < n_batches && pos.step < total_steps {
                // One accumulation group: Lightning steps after `accum` batches or at the epoch's end.
                let group_end = (pos.batch + accum).min(n_batches);
                let mut group = Accumulator::new(&trainable, accum);
                for b in pos.batch..group_end {
                    if cancel.load(Ordering::SeqCst) {
                        let ckpt = self.checkpoint(&out, &pos, &metrics)?;
                        return Ok(Outcome::Cancelled { checkpoint: ckpt });
                    }
                    let idx = pos.order[b * bs..((b + 1) * bs).min(pos.order.len())].to_vec();
                    let batch = self.load_batch(&idx, false)?;
                    // Masks depend only on (seed, epoch, batch): a resumed run draws the same.
                    let mask_seed = cfg.seed
                        ^ (((pos.epoch as u64) << 32) | b as u64)
                            .wrapping_mul(0xD6E8_FEB8_6659_FD93);
                    self.policy.backbone().train_mode().enable(mask_seed);
                    let value = group.add(
                        &self.policy,
                        &trainable,
                        &batch,
                        cfg.arm_gripper_loss_ratio,
                        pos.step,
                    )?;
                    samples_done += idx.len();
                    report(Phase::Training, &pos, value, lr, samples_done);
                }
                lr = cfg.learning_rate * self.schedule.factor(pos.step);
                let clip = cfg.gradient_clip.map(|c| c.max_norm);
                let (loss, grad_norm) = group.apply(&mut self.opt, &trainable, clip, lr)?;
                pos.step += 1;
                pos.batch = group_end;
                pos.last_loss = Some(loss);
                metrics.write(&serde_json::json!({
                    "step": pos.step, "epoch": pos.epoch, "loss": loss, "lr": lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": samples_done as f64 / started.elapsed().as_secs_f64().max(1e-9),
                }))?;
                lr = cfg.learning_rate * self.schedule.factor(pos.step);
                report(Phase::Training, &pos, loss, lr, samples_done);
                let every = cfg.checkpoint_every_n_steps as u64;
                if every > 0 && pos.step % every == 0 && pos.step < total_steps {
                    report(Phase::Saving, &pos, loss, lr, samples_done);
                    self.checkpoint(&out, &pos, &metrics)?;
                }
            }
            let loss = loss_now(&pos);
            let val = self.validate(&mut |phase, _| report(phase, &pos, loss, lr, samples_done))?;
            if let Some(v) = val {
                pos.best_val_loss = Some(pos.best_val_loss.map_or(v, |b: f64| b.min(v)));
            }
            metrics.write(&serde_json::json!({
                "epoch": pos.epoch, "step": pos.step, "train_loss": pos.last_loss, "val_loss": val,
            }))?;
            tracing::info!(
                "epoch {} done at step {}: loss {loss:.5}, val loss {val:?}",
                pos.epoch,
                pos.step
            );
            let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
            if let Err(e) = super::plot::render(&text, &out.join(LOSS_PLOT)) {
                tracing::warn!("{LOSS_PLOT} not written: {e}");
            }
            if pos.batch >= n_batches {
                pos.epoch += 1;
                pos.batch = 0;
                pos.order = epoch_order(cfg.seed, pos.epoch, self.train.len());
            }
            report(Phase::Saving, &pos, loss, lr, samples_done);
            last_ckpt = Some(self.checkpoint(&out, &pos, &metrics)?);
        }
        report(Phase::Saving, &pos, loss_now(&pos), lr, samples_done);
        let model_dir = self.write_model(&out)?;
        let checkpoint = match last_ckpt {
            Some(c) => c,
            None => self.checkpoint(&out, &pos, &metrics)?,
        };
        Ok(Outcome::Done {
            model_dir,
            checkpoint,
            metrics: metrics_path,
            final_loss: loss_now(&pos),
            best_val_loss: pos.best_val_loss,
        })
    }

    fn checkpoint(
        &self,
        out: &Path,
        pos: &RunState,
        metrics: &Metrics,
    ) -> Result<PathBuf, TrainError> {
        let st = RunState {
            metrics_lines: metrics.lines,
            ..pos.clone()
        };
        state::save(out, &st, &self.params, &self.opt)
    }

    /// Writes `<out>/model` (all weights, LoRA adapters merged into theirs, `policy.json` with
    /// the training window) atomically.
    fn write_model(&self, out: &Path) -> Result<PathBuf, TrainError> {
        let mut tensors = self.params.tensors();
        if let Some(l) = &self.lora {
            let n = lora::merge(&mut tensors, lora::scale(l))?;
            tracing::info!("merged {n} LoRA adapters into their layers' weights");
        }
        let src = &self.opts.model;
        let read = |f: &str| std::fs::read(src.join(f)).map_err(io_err(&src.join(f)));
        let config = read(model_dir::CONFIG_FILE)?;
        let tokenizer = read(model_dir::TOKENIZER_FILE)?;
        let dest = out.join(MODEL_DIR);
        publish_model_dir(&dest, &config, &tokenizer, &self.policy_cfg, &tensors)?;
        Ok(dest)
    }
}
