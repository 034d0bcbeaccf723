//! `make bench`: the memory planner's estimated peak vs the measured peak RSS of the real
//! [`Trainer`] running two optimiser steps, for the tiny and small Kosmos-2 shapes across the
//! strategies this build runs.
//!
//! Each case runs in its own process (`train_memory --case <shape> <strategy>`), so its `VmHWM` is
//! its own; the parent writes the model directories (random weights) and episodes once, then
//! prints estimate vs measured and the ratio. `MOBILE_VLA_BENCH_SHAPES` (default `tiny,small`)
//! picks the shapes.

mod child;
mod train_setup;

use anyhow::{Context, Result};
use mobile_vla::config::TrainConfig;
use mobile_vla::train::plan::{self, ModelSizes, Rung, Workload, LADDER};
use mobile_vla::train::{Strategy, TrainOptions, Trainer};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use train_setup::{mib, Shape, SHAPES};

fn work_dir(shape: &str) -> PathBuf {
    train_setup::work_dir("bench-train-memory", shape)
}

/// Two optimiser steps (no accumulation), dropout as the backbone config says, no validation.
fn config(shape: &Shape) -> String {
    format!(
        "seed: 1\nbatch_size: {}\nwindow_size: {}\nlearning_rate: 1.0e-4\nmin_lr_scale: 0.1\nweight_decay: 0.0\nval_fraction: 0.0\n\
         checkpoint_every_n_steps: 0\ntrain_setup: {{freeze_backbone: false, lora_enable: false}}\n\
         trainer: {{max_epochs: 1, max_steps: 2, accumulate_grad_batches: 1, precision: 32}}\n",
        shape.batch, shape.window
    )
}

/// Child: estimate, then two real optimiser steps; prints one JSON line.
fn run_case(shape: &Shape, rung: Rung) -> Result<()> {
    let dir = work_dir(shape.name);
    let mut cfg = TrainConfig::from_file(&dir.join("train.yaml"))?;
    // Exactly the rung's setup (its `--strategy` alone would not turn checkpointing on).
    cfg.train_setup = rung.setup(&cfg.train_setup);
    let model = dir.join("model");
    let (backbone, _, sizes) = ModelSizes::read(&model)?;
    let work = Workload {
        batch: shape.batch,
        window: shape.window,
        // `<s>` + the instruction + `</s>` as the dataset tokenises it (measured below too).
        prompt_tokens: plan::PROMPT_TOKENS,
        accumulate: 1,
    };
    let est = plan::estimate(rung, &cfg, &backbone, &sizes, work);
    let out = dir.join(format!("run-{}", rung.strategy_name()));
    let _ = std::fs::remove_dir_all(&out);
    let opts = TrainOptions {
        config: cfg,
        data: dir.join("episodes"),
        model,
        out,
        resume: false,
        max_steps: Some(2),
        strategy: Strategy::Config,
        budget: None,
    };
    let t = std::time::Instant::now();
    let mut trainer = Trainer::new(opts)?;
    trainer.run(&mut |_| {}, &AtomicBool::new(false))?;
    let measured = plan::peak_resident_memory().context("no VmHWM")?;
    println!(
        "{}",
        serde_json::json!({
            "shape": shape.name, "strategy": rung.name(), "estimate": est.peak(),
            "training": est.training(), "load": est.load, "activations": est.activations,
            "measured": measured, "seconds": t.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    child::default_threads();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let (shape, strategy) = (&args[i + 1], &args[i + 2]);
        let shape = train_setup::shape(shape)?;
        let rung = LADDER
            .into_iter()
            .find(|r| r.strategy_name() == strategy.as_str())
            .context("unknown strategy")?;
        return run_case(shape, rung);
    }
    let wanted = std::env::var("MOBILE_VLA_BENCH_SHAPES").unwrap_or("tiny,small".into());
    let exe = std::env::current_exe()?;
    println!(
        "{:<6} {:<22} {:>11} {:>11} {:>7}",
        "shape", "strategy", "estimate", "measured", "ratio"
    );
    for shape in SHAPES
        .iter()
        .filter(|s| wanted.split(',').any(|w| w == s.name))
    {
        // Enough windows for two batches.
        let dir = work_dir(shape.name);
        train_setup::prepare(shape, &dir, 2 * shape.batch)?;
        std::fs::write(dir.join("train.yaml"), config(shape))?;
        for rung in LADDER {
            let mut cmd = Command::new(&exe);
            cmd.args(["--case", shape.name, rung.strategy_name()])
                .env("RUST_LOG", "warn");
            let v = child::run_json_child(cmd, &format!("{} {}", shape.name, rung.name()))?;
            let mib = |k: &str| mib(v[k].as_f64().unwrap_or(f64::NAN));
            println!(
                "{:<6} {:<22} {:>9.0}Mi {:>9.0}Mi {:>7.3}   (training {:.0}Mi, load {:.0}Mi, activations {:.0}Mi; {:.1} s)",
                shape.name,
                rung.name(),
                mib("estimate"),
                mib("measured"),
                mib("estimate") / mib("measured"),
                mib("training"),
                mib("load"),
                mib("activations"),
                v["seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}
