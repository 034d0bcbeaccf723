//! On-device fine-tuning: the RoboVLMs training recipe in candle.
//!
//! - [`params`]: which parameters train (RoboVLMs `_trainable_params_setup`) and the printed table;
//! - [`lora`]: LoRA adapters (peft's semantics) and their merge into the base weights;
//! - [`loss`]: batches and RoboVLMs' masked Huber + gripper BCE loss;
//! - [`optim`]: AdamW (torch semantics), RoboVLMs' schedules, global-norm clipping;
//! - [`accumulate`]: Lightning's gradient accumulation, one optimiser step per group;
//! - [`strategy`]: `--strategy` (what to train);
//! - [`plan`]: the memory planner (`mobile_vla plan`, `--strategy auto`);
//! - [`state`]: run checkpoints for `--resume`;
//! - [`plot`] draws `loss.png`;
//! - [`trainer`]: the loop ([`Trainer`]), with progress callbacks and cancellation;
//! - [`init`]: a fresh model directory (action token + head) on a Hugging Face Kosmos-2.

pub mod accumulate;
pub mod init;
pub mod lora;
pub mod loss;
mod metrics;
pub mod optim;
pub mod params;
pub mod plan;
pub mod plot;
pub mod state;
pub mod strategy;
pub mod trainer;

pub use strategy::Strategy;
pub use trainer::{Outcome, Phase, Progress, TrainOptions, Trainer};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::train::ConfigError),
    #[error(transparent)]
    Model(#[from] crate::model::error::ModelError),
    #[error(transparent)]
    Dataset(#[from] crate::data::dataset::DatasetError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config's `{key}` is {config} but the model directory {model_dir} has {model} (the model directory owns the architecture)")]
    Mismatch {
        key: &'static str,
        config: String,
        model: String,
        model_dir: PathBuf,
    },
    #[error("{dir}: no training window: every training episode is shorter than window_size {window} (longest has {longest} frames); record longer episodes or lower `window_size`")]
    NoWindows {
        dir: PathBuf,
        window: usize,
        longest: usize,
    },
    #[error("loss is not finite at optimiser step {step} (batch of episodes {episodes:?}); the last good checkpoint is kept")]
    NonFiniteLoss { step: u64, episodes: Vec<PathBuf> },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    NothingFits(#[from] plan::NothingFits),
    #[error("{path} already holds a run (checkpoint.json); pass --resume to continue it or pick another --out")]
    RunExists { path: PathBuf },
    #[error("--resume: {path} has no checkpoint to resume from")]
    NothingToResume { path: PathBuf },
}
