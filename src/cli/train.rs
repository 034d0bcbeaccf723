//! `mobile_vla train`: a thin wrapper over [`crate::train::Trainer`] with an indicatif bar or
//! JSON progress lines (`--progress json`, the trainer_node contract), and SIGINT/SIGTERM handling
//! (save a checkpoint, exit 0).

use crate::config::train::ModelClaims;
use crate::config::TrainConfig;
use crate::train::{Outcome, Phase, Progress, Strategy, TrainOptions, Trainer};
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProgressMode {
    /// A progress bar on stderr.
    Bar,
    /// One JSON object per line on stdout, at least once per second (logs stay on stderr).
    Json,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training config: the project's YAML (config/on_device_full_ft.yaml) or a RoboVLMs JSON.
    #[arg(long)]
    pub config: PathBuf,
    /// Folder of episodes (*.h5).
    #[arg(long)]
    pub data: PathBuf,
    /// Model directory to start from (`model init` or `model import`).
    #[arg(long)]
    pub model: PathBuf,
    /// Run folder: checkpoints, metrics.jsonl and the trained model/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimiser steps (overrides trainer.max_steps).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// What to train; `config` = train_setup as the config says.
    #[arg(long, value_enum, default_value = "config")]
    pub strategy: Strategy,
    /// Memory `--strategy auto` fits the run in, as `mobile_vla plan --budget` (default: this
    /// machine's available memory).
    #[arg(long, value_parser = crate::train::plan::parse_bytes)]
    pub budget: Option<u64>,
    #[arg(long, value_enum, default_value = "bar")]
    pub progress: ProgressMode,
    /// Print the equivalent RoboVLMs JSON config on stdout and exit (the strategy's train_setup,
    /// the model directory's head and chunk sizes): the way out to RoboVLMs + Lightning on a GPU
    /// cluster; `model import` is the way back.
    #[arg(long)]
    pub print_robovlms_config: bool,
}

/// Where progress goes: the latest report, re-sent every second by a ticker in JSON mode.
struct Reporter {
    mode: ProgressMode,
    last: Mutex<(Option<Progress>, Instant)>,
    bar: indicatif::ProgressBar,
}

impl Reporter {
    fn new(mode: ProgressMode) -> Self {
        let bar = match mode {
            ProgressMode::Json => indicatif::ProgressBar::hidden(),
            ProgressMode::Bar => {
                let bar = indicatif::ProgressBar::new(0);
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                bar.set_style(style);
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            }
        };
        Self {
            mode,
            last: Mutex::new((None, Instant::now())),
            bar,
        }
    }

    fn emit(p: &Progress) {
        let mut v = serde_json::to_value(p).unwrap_or_default();
        v["event"] = json!("progress");
        println!("{v}");
    }

    fn report(&self, p: &Progress) {
        match self.mode {
            ProgressMode::Json => {
                if let Ok(mut last) = self.last.lock() {
                    let changed = last.0.as_ref().is_none_or(|l| l.phase != p.phase);
                    if changed || last.1.elapsed() >= Duration::from_secs(1) {
                        Self::emit(p);
                        last.1 = Instant::now();
                    }
                    last.0 = Some(p.clone());
                }
            }
            ProgressMode::Bar => {
                self.bar.set_length(p.total_steps);
                self.bar.set_position(p.step);
                self.bar
                    .set_prefix(format!("{}/{}", (p.epoch + 1).min(p.epochs), p.epochs));
                self.bar.set_message(format!(
                    "{:?} loss {:.4} lr {:.2e} {:.2} samples/s",
                    p.phase, p.loss, p.lr, p.samples_per_s
                ));
            }
        }
    }

    /// Re-sends the latest report when nothing was printed for a second (long batches, loading).
    fn tick(&self) {
        if let Ok(mut last) = self.last.lock() {
            if last.1.elapsed() >= Duration::from_secs(1) {
                if let Some(p) = &last.0 {
                    Self::emit(p);
                }
                last.1 = Instant::now();
            }
        }
    }
}

fn event(mode: ProgressMode, v: serde_json::Value) {
    if let ProgressMode::Json = mode {
        println!("{v}");
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mode = args.progress;
    let result = train(args);
    if let Err(e) = &result {
        event(
            mode,
            json!({"event": "error", "message": crate::logging::error_chain(e)}),
        );
    }
    result
}

/// `--print-robovlms-config`: the config with `--strategy`'s train_setup and the model
/// directory's architecture.
fn robovlms_config(args: &TrainArgs, config: TrainConfig) -> anyhow::Result<serde_json::Value> {
    if args.strategy == Strategy::Auto {
        anyhow::bail!(
            "--print-robovlms-config needs an explicit --strategy: `auto` depends on this \
             machine's memory, and a GPU cluster has its own"
        );
    }
    let policy_file = args.model.join(crate::model::model_dir::POLICY_FILE);
    let p = crate::model::PolicyConfig::from_file(&policy_file)?;
    let model = ModelClaims {
        fwd_pred_next_n: Some(p.fwd_pred_next_n),
        action_dim: Some(p.action.dim),
        hidden_size: Some(p.head.hidden_size),
        num_layers: Some(p.head.num_layers),
        norm: p.action.norm.map(|n| (f64::from(n.min), f64::from(n.max))),
    };
    let setup = args.strategy.setup(&config.train_setup);
    let config = TrainConfig {
        window_size: config.window_size.or(Some(p.window_size)),
        ..config
    };
    Ok(config.to_robovlms_json(&setup, &model))
}

fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).context("installing signal handlers")?;
    }
    let config = TrainConfig::from_file(&args.config)?;
    if args.print_robovlms_config {
        let json = robovlms_config(&args, config)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let reporter = Arc::new(Reporter::new(args.progress));
    let done = Arc::new(AtomicBool::new(false));
    reporter.report(&Progress {
        phase: Phase::Loading,
        epoch: 0,
        epochs: config.max_epochs,
        step: 0,
        total_steps: 0,
        loss: f64::NAN,
        lr: config.learning_rate,
        samples_per_s: 0.0,
        eta_s: 0.0,
    });
    let ticker = {
        let (reporter, done) = (reporter.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if let ProgressMode::Json = reporter.mode {
                    reporter.tick();
                }
            }
        })
    };
    let opts = TrainOptions {
        config,
        data: args.data,
        model: args.model,
        out: args.out,
        resume: args.resume,
        max_steps: args.max_steps,
        strategy: args.strategy,
        budget: args.budget,
    };
    // Trainer::new logs the trainable-parameter table.
    let outcome =
        Trainer::new(opts).and_then(|mut t| t.run(&mut |p: &Progress| reporter.report(p), &cancel));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = ticker.join();
    reporter.bar.finish_and_clear();
    match outcome? {
        Outcome::Done {
            model_dir,
            checkpoint,
            metrics,
            final_loss,
            best_val_loss,
        } => {
            event(
                args.progress,
                json!({"event": "done", "model_dir": model_dir, "checkpoint": checkpoint,
                       "metrics": metrics, "final_loss": final_loss, "best_val_loss": best_val_loss}),
            );
            eprintln!(
                "trained model: {} (final loss {final_loss:.5}, best val loss {best_val_loss:?})",
                model_dir.display()
            );
        }
        Outcome::Cancelled { checkpoint } => {
            event(
                args.progress,
                json!({"event": "cancelled", "checkpoint": checkpoint}),
            );
            eprintln!(
                "stopped by signal; checkpoint {} (continue with --resume)",
                checkpoint.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
