//! `make bench`: training throughput (samples/s) and peak RSS, candle (the real [`Trainer`]) vs
//! PyTorch eager (`benches/torch_train_step.py`: the PyTorch reference of the trainer's parity
//! tests), for full fine-tuning (SEED 6.1) and LoRA on a frozen backbone (6.2).
//!
//! Both run the same run on the small Kosmos-2 shape (`benches/kosmos2-small.config.json`, the same
//! model directory and batch × window as `train_memory`): `config/low_memory.yaml`'s optimiser and
//! LoRA settings (AdamW lr 2e-5, constant schedule, clipping at 1.0; r 32, alpha 16, dropout 0.1)
//! with accumulation 2 and precision 32, train-mode dropout, `WARMUP` untimed optimiser steps, then
//! `MOBILE_VLA_BENCH_TRAIN_STEPS` (default 3) timed ones, of which the median counts (the machine
//! may be shared: a step slowed by another process should not decide). candle's time includes its data pipeline
//! (episodes read and frames resized per batch); PyTorch draws random tensors of the same shapes.
//! Each case runs in its own process, so its peak RSS (`VmHWM`, read after the last step, before
//! anything is saved) is its own. Threads as in `policy_step`: `RAYON_NUM_THREADS` (default 2) for
//! both frameworks' matmuls, `CANDLE_NUM_THREADS` (default 1) for candle's element-wise ops.
//! `MOBILE_VLA_TORCH_PYTHON` names the interpreter with torch + transformers + peft (default the
//! repository's `.cache/torch-venv`); without one only candle runs.

mod child;
mod train_setup;

use anyhow::{bail, Context, Result};
use mobile_vla::config::train::Precision;
use mobile_vla::config::TrainConfig;
use mobile_vla::model::tokenizer::PromptTokenizer;
use mobile_vla::train::plan::peak_resident_memory;
use mobile_vla::train::{Phase, Strategy, TrainOptions, Trainer};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use train_setup::{mib, Shape};

const SHAPE: &str = "small";
const WARMUP: usize = 1;
const ACCUMULATE: usize = 2;
/// Issue #9's targets: candle at least this much faster, and at most this much of PyTorch's memory.
const TARGET_SPEED: f64 = 1.2;
const TARGET_MEMORY: f64 = 0.8;
const STRATEGIES: [(&str, Strategy); 2] = [("full", Strategy::Full), ("lora", Strategy::Lora)];

fn work_dir() -> PathBuf {
    train_setup::work_dir("bench-train-speed", SHAPE)
}

fn timed_steps() -> Result<usize> {
    std::env::var("MOBILE_VLA_BENCH_TRAIN_STEPS").map_or(Ok(3), |v| {
        v.parse()
            .with_context(|| format!("MOBILE_VLA_BENCH_TRAIN_STEPS={v:?}: expected a count"))
    })
}

/// `config/low_memory.yaml` (SEED 6.2) sized for the bench: the shape's batch and window,
/// accumulation `ACCUMULATE`, precision 32, one epoch of `steps` optimiser steps, no validation
/// and no intermediate checkpoints.
fn config(shape: &Shape, steps: usize) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::from_file(&train_setup::root().join("config/low_memory.yaml"))?;
    cfg.batch_size = shape.batch;
    cfg.window_size = Some(shape.window);
    cfg.accumulate_grad_batches = ACCUMULATE;
    cfg.precision = Precision::F32;
    cfg.max_epochs = 1;
    cfg.max_steps = Some(steps);
    cfg.val_fraction = 0.0;
    cfg.checkpoint_every_n_steps = 0;
    Ok(cfg)
}

/// Child: the real trainer; prints one JSON line with the same keys as the torch script.
fn run_candle(name: &str, strategy: Strategy) -> Result<()> {
    let shape = train_setup::shape(SHAPE)?;
    let steps = timed_steps()?;
    let dir = work_dir();
    let out = dir.join(format!("run-{name}"));
    let _ = std::fs::remove_dir_all(&out);
    let mut trainer = Trainer::new(TrainOptions {
        config: config(shape, WARMUP + steps)?,
        data: dir.join("episodes"),
        model: dir.join("model"),
        out,
        resume: false,
        max_steps: None,
        strategy,
        budget: None,
    })?;
    let trainable = trainer.params().num_trainable();
    // done[k]: when optimiser step k + 1 finished; the peak is read after the last one.
    let mut done: Vec<Instant> = Vec::new();
    let mut peak = None;
    trainer.run(
        &mut |p| {
            if p.phase == Phase::Training && p.step as usize > done.len() {
                done.push(Instant::now());
                if done.len() == WARMUP + steps {
                    peak = peak_resident_memory();
                }
            }
        },
        &AtomicBool::new(false),
    )?;
    let (true, Some(peak)) = (done.len() == WARMUP + steps, peak) else {
        bail!(
            "the run stopped after {} of {} steps",
            done.len(),
            WARMUP + steps
        );
    };
    let step_s = median(
        done[WARMUP - 1..]
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect(),
    );
    println!(
        "{}",
        serde_json::json!({
            "framework": "candle", "strategy": name, "trainable": trainable,
            "samples_per_s": (ACCUMULATE * shape.batch) as f64 / step_s,
            "step_s": step_s, "peak_rss": peak,
            "threads": candle_core::utils::get_num_threads(),
        })
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => 0.5 * (xs[n / 2 - 1] + xs[n / 2]),
    }
}

/// The torch script's arguments for the same run.
fn torch_command(python: &PathBuf, name: &str, shape: &Shape, ids: &[u32]) -> Result<Command> {
    let steps = timed_steps()?;
    let cfg = config(shape, WARMUP + steps)?;
    let lora = Strategy::Lora
        .setup(&cfg.train_setup)
        .lora
        .context("the LoRA strategy without LoRA settings")?;
    let clip = cfg
        .gradient_clip
        .context("config/low_memory.yaml sets no gradient_clip_val")?;
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let mut cmd = Command::new(python);
    cmd.arg(train_setup::root().join("benches/torch_train_step.py"))
        .arg("--model")
        .arg(work_dir().join("model"))
        .args(["--strategy", name, "--ids", &ids.join(",")])
        .args(["--batch", &shape.batch.to_string()])
        .args(["--accumulate", &ACCUMULATE.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--lr", &cfg.learning_rate.to_string()])
        .args(["--weight-decay", &cfg.weight_decay.to_string()])
        .args(["--clip", &clip.max_norm.to_string()])
        .args(["--seed", &cfg.seed.to_string()])
        .args([
            "--threads",
            &candle_core::utils::get_num_threads().to_string(),
        ])
        .arg("--lora")
        .args([
            lora.r.to_string(),
            lora.alpha.to_string(),
            lora.dropout.to_string(),
            lora.bias,
        ]);
    Ok(cmd)
}

fn torch_python() -> Option<PathBuf> {
    let p = std::env::var_os("MOBILE_VLA_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| train_setup::root().join(".cache/torch-venv/bin/python"));
    p.exists().then_some(p)
}

fn main() -> Result<()> {
    child::default_threads();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let name = args
            .get(i + 1)
            .context("usage: train_speed --case <strategy>")?;
        let (name, strategy) = STRATEGIES
            .into_iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("unknown strategy {name:?} (full, lora)"))?;
        return run_candle(name, strategy);
    }

    let shape = train_setup::shape(SHAPE)?;
    let steps = timed_steps()?;
    // One training window per episode, enough for every step's batches.
    train_setup::prepare(
        shape,
        &work_dir(),
        (WARMUP + steps) * ACCUMULATE * shape.batch,
    )?;
    let tokenizer = PromptTokenizer::from_file(&train_setup::root().join(shape.tokenizer))?;
    let ids = tokenizer.encode_instruction(train_setup::INSTRUCTION)?;
    let python = torch_python();
    if python.is_none() {
        eprintln!("[bench] no torch interpreter (set MOBILE_VLA_TORCH_PYTHON or run `make bench`): torch side skipped");
    }
    let exe = std::env::current_exe()?;
    println!(
        "\ntraining, {SHAPE} shape (batch {} × window {}, accumulation {ACCUMULATE}, precision 32), \
         median of {steps} timed optimiser steps after {WARMUP} warm-up, {} threads",
        shape.batch,
        shape.window,
        candle_core::utils::get_num_threads()
    );
    println!("| strategy | framework | trainable | samples/s | s/step | peak RSS |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (name, _) in STRATEGIES {
        let mut cmd = Command::new(&exe);
        cmd.args(["--case", name]).env("RUST_LOG", "warn");
        let mut rows = vec![child::run_json_child(cmd, &format!("candle {name}"))?];
        if let Some(py) = &python {
            let cmd = torch_command(py, name, shape, &ids)?;
            rows.push(child::run_json_child(cmd, &format!("torch {name}"))?);
        }
        let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        for r in &rows {
            println!(
                "| {name} | {} | {:.2} M | {:.3} | {:.2} | {:.0} MiB |",
                r["framework"].as_str().unwrap_or("?"),
                f(r, "trainable") / 1e6,
                f(r, "samples_per_s"),
                f(r, "step_s"),
                mib(f(r, "peak_rss")),
            );
        }
        if let [candle, torch] = &rows[..] {
            if candle["trainable"] != torch["trainable"] {
                eprintln!(
                    "[bench] {name}: trainable parameters differ: candle {} vs torch {}",
                    candle["trainable"], torch["trainable"]
                );
            }
            let speed = f(candle, "samples_per_s") / f(torch, "samples_per_s");
            let memory = f(candle, "peak_rss") / f(torch, "peak_rss");
            ratios.push((name, speed, memory));
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for (name, speed, memory) in ratios {
        println!(
            "{name}: candle/torch speed {speed:.2}× (target ≥ {TARGET_SPEED}×: {}), \
             memory {memory:.2}× (target ≤ {TARGET_MEMORY}×: {})",
            verdict(speed >= TARGET_SPEED),
            verdict(memory <= TARGET_MEMORY)
        );
    }
    Ok(())
}
