//! `make bench`: the memory planner on the full Kosmos-2 shape (microsoft/kosmos-2-patch14-224's
//! config, random weights) on this machine. `mobile_vla plan` picks the strongest strategy that
//! fits the budget, then `mobile_vla train --strategy auto --max-steps 2` (same budget) runs it;
//! the bench prints the estimate against the train process's measured peak RSS (`VmHWM`), for
//! loading and for the two steps and saving separately (the peak is reset in between).
//!
//! The model directory (~6.6 GB of f32 weights, no download) is written once into
//! `target/bench-train-full/full/model` and reused; the run's outputs are removed afterwards.
//! Environment:
//! - `MOBILE_VLA_BENCH_FULL=0` skips it (minutes, and the machine's memory);
//! - `MOBILE_VLA_BENCH_FULL_BUDGET` (default `18GiB`) caps the budget below `MemAvailable`, so a
//!   shared machine keeps room for the rest of its work.

// Shared with the other training benches; this one uses the writers only.
#[allow(dead_code)]
mod train_setup;

use anyhow::{bail, Context, Result};
use mobile_vla::config::TrainConfig;
use mobile_vla::train::plan::{self, ModelSizes, Workload};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use train_setup::{mib, Shape};

const FULL: Shape = Shape {
    name: "full",
    config: "test/fixtures/kosmos2/kosmos-2-patch14-224.config.json",
    tokenizer: "test/fixtures/policy/native/tokenizer.json",
    batch: 1,
    window: 2,
};

/// Two optimiser steps (no accumulation, no validation, no mid-epoch checkpoint).
const CONFIG: &str =
    "seed: 1\nbatch_size: 1\nwindow_size: 2\nlearning_rate: 1.0e-4\nmin_lr_scale: 0.1\n\
    weight_decay: 0.0\nval_fraction: 0.0\ncheckpoint_every_n_steps: 0\n\
    train_setup: {freeze_backbone: false, lora_enable: false}\n\
    trainer: {max_epochs: 1, max_steps: 2, accumulate_grad_batches: 1, precision: 32}\n";

/// The cached model directory, written unless one with the same backbone config is complete
/// (`policy.json` is written last).
fn model_dir(dir: &Path) -> Result<std::path::PathBuf> {
    let model = dir.join("model");
    let want = std::fs::read(train_setup::root().join(FULL.config))?;
    let complete = model.join("policy.json").is_file()
        && std::fs::read(model.join("config.json")).is_ok_and(|c| c == want);
    if !complete {
        let _ = std::fs::remove_dir_all(&model);
        let t = Instant::now();
        eprintln!("[bench] writing the full-shape model directory (random weights, ~6.6 GB) ...");
        train_setup::write_model(&FULL, &model)?;
        eprintln!("[bench] written in {:.0} s", t.elapsed().as_secs_f64());
    }
    Ok(model)
}

/// Runs a `mobile_vla train --progress json` child to its end; returns its JSON lines and the
/// peak resident memory of loading (up to the first `training` progress line) and of the rest
/// (two steps, saving), in bytes.
fn run_train(mut cmd: Command) -> Result<(Vec<serde_json::Value>, u64, u64)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start mobile_vla train")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut lines, mut load, mut hwm) = (Vec::new(), None, 0);
    // Progress lines come at least once a second; the last `VmHWM` read before the child exits
    // is its peak (it stops growing after the last step; saving frees as it goes).
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        hwm = plan::peak_resident_memory_of(pid).unwrap_or(hwm);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if load.is_none() && v["phase"] == "training" {
            load = Some(hwm);
            // Linux: `5` resets VmHWM to the current resident memory, so from here on it is
            // the training's peak.
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
                .context("cannot reset the child's VmHWM")?;
            hwm = 0;
        }
        lines.push(v);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("mobile_vla train failed ({status})");
    }
    let load = load.context("mobile_vla train never reported the training phase")?;
    Ok((lines, load, hwm))
}

fn main() -> Result<()> {
    if std::env::var("MOBILE_VLA_BENCH_FULL").is_ok_and(|v| v == "0") {
        eprintln!("[bench] MOBILE_VLA_BENCH_FULL=0: full-shape training skipped");
        return Ok(());
    }
    let cap_text = std::env::var("MOBILE_VLA_BENCH_FULL_BUDGET").unwrap_or("18GiB".into());
    let cap = plan::parse_bytes(&cap_text).map_err(anyhow::Error::msg)?;
    let available = plan::available_memory().context("cannot read MemAvailable")?;
    // Whole MiB, as passed on the command lines.
    let budget = available.min(cap) >> 20 << 20;
    let dir = train_setup::work_dir("bench-train-full", FULL.name);
    std::fs::create_dir_all(&dir)?;
    let model = model_dir(&dir)?;
    let data = dir.join("episodes");
    let _ = std::fs::remove_dir_all(&data);
    // Two windows: two batches of one.
    train_setup::write_episodes(&FULL, &data, 2)?;
    let config = dir.join("train.yaml");
    std::fs::write(&config, CONFIG)?;
    let out = dir.join("run");
    let _ = std::fs::remove_dir_all(&out);

    // The planner's figures, as `mobile_vla plan` computes them.
    let cfg = TrainConfig::from_file(&config)?;
    let (backbone, _, sizes) = ModelSizes::read(&model)?;
    let work = Workload {
        batch: cfg.batch_size,
        window: FULL.window,
        prompt_tokens: plan::PROMPT_TOKENS,
        accumulate: cfg.accumulate_grad_batches,
    };
    let p = plan::plan(&cfg, &backbone, &sizes, work, budget);
    let chosen = p.chosen()?.clone();

    let exe = env!("CARGO_BIN_EXE_mobile_vla");
    let budget_arg = format!("{}MiB", budget >> 20);
    println!(
        "budget {:.0} MiB (MemAvailable {:.0} MiB, capped at {cap_text}: the machine is shared)\n\
         $ mobile_vla plan --config {} --model {} --budget {budget_arg}",
        mib(budget as f64),
        mib(available as f64),
        config.display(),
        model.display()
    );
    let mut cmd = Command::new(exe);
    cmd.args(["plan", "--budget", &budget_arg, "--config"])
        .arg(&config)
        .arg("--model")
        .arg(&model);
    let plan_out = cmd.output().context("cannot start mobile_vla plan")?;
    if !plan_out.status.success() {
        bail!(
            "mobile_vla plan failed:\n{}",
            String::from_utf8_lossy(&plan_out.stderr)
        );
    }
    let plan_out = String::from_utf8_lossy(&plan_out.stdout);
    print!("{plan_out}");
    if !plan_out.contains(&format!("auto: {} is the strongest", chosen.rung.name())) {
        bail!("`mobile_vla plan` chose differently from the planner here");
    }

    println!(
        "$ mobile_vla train --strategy auto --budget {budget_arg} --max-steps 2 (batch 1 × window 2)"
    );
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--strategy", "auto", "--max-steps", "2"])
        .args(["--budget", &budget_arg, "--progress", "json", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn");
    let t = Instant::now();
    let (lines, load, training) = run_train(cmd)?;
    let seconds = t.elapsed().as_secs_f64();
    let done = lines
        .iter()
        .find(|v| v["event"] == "done")
        .context("mobile_vla train printed no done event")?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let start: serde_json::Value = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v["event"] == "start")
        .context("metrics.jsonl has no start event")?;
    let ran = start["strategy"].as_str().unwrap_or("?").to_owned();
    let steps = metrics
        .lines()
        .filter(|l| l.contains("\"grad_norm\""))
        .count();
    if serde_json::to_value(chosen.rung.strategy())? != start["strategy"] || steps != 2 {
        bail!(
            "train ran {ran} for {steps} steps; the plan chose {}",
            chosen.rung.name()
        );
    }
    if !done["final_loss"].as_f64().is_some_and(f64::is_finite) {
        bail!("the final loss is not finite: {}", done["final_loss"]);
    }
    println!(
        "trained: strategy {ran} ({}), {steps} steps, final loss {}, {seconds:.0} s",
        start["strategy_reason"].as_str().unwrap_or(""),
        done["final_loss"]
    );
    println!(
        "{:<28} {:>11} {:>11} {:>7}",
        chosen.rung.name(),
        "estimate",
        "measured",
        "ratio"
    );
    for (what, est, measured) in [
        ("loading", chosen.loading(), load),
        ("training (2 steps + save)", chosen.training(), training),
        ("peak", chosen.peak(), load.max(training)),
    ] {
        println!(
            "{what:<28} {:>9.0}Mi {:>9.0}Mi {:>7.3}",
            mib(est as f64),
            mib(measured as f64),
            est as f64 / measured as f64
        );
    }
    println!(
        "(measured = the train process's VmHWM; activations {:.0}Mi of the training estimate)",
        mib(chosen.activations as f64)
    );
    // The run's model copy and checkpoint are as large as the model: not kept.
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
