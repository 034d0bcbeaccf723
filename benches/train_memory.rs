//! `make bench`: the memory planner's estimated peak vs the measured peak RSS of the real
//! [`Trainer`] running two optimiser steps, for the tiny and small Kosmos-2 shapes across the
//! strategies this build runs.
//!
//! Each case runs in its own process (`train_memory --case <shape> <strategy>`), so its `VmHWM` is
//! its own; the parent writes the model directories (random weights) and episodes once, then
//! prints estimate vs measured and the ratio. `MOBILE_VLA_BENCH_SHAPES` (default `tiny,small`)
//! picks the shapes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use mobile_vla::config::TrainConfig;
use mobile_vla::data::episode::{EpisodeWriter, EventType, WriteOptions};
use mobile_vla::data::image::ChannelOrder;
use mobile_vla::model::kosmos2::Kosmos2Config;
use mobile_vla::model::model_dir::save_model_dir;
use mobile_vla::model::tokenizer::PromptTokenizer;
use mobile_vla::model::{Policy, PolicyConfig};
use mobile_vla::train::plan::{self, ModelSizes, Rung, Workload, LADDER};
use mobile_vla::train::{Strategy, TrainOptions, Trainer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;

struct Shape {
    name: &'static str,
    /// Backbone config and tokenizer, relative to the repository root.
    config: &'static str,
    tokenizer: &'static str,
    batch: usize,
    window: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "tiny",
        config: "test/fixtures/policy/hf_robovlms7/config.json",
        tokenizer: "test/fixtures/policy/hf_robovlms7/tokenizer.json",
        batch: 2,
        window: 4,
    },
    Shape {
        name: "small",
        config: "benches/kosmos2-small.config.json",
        tokenizer: "test/fixtures/policy/native/tokenizer.json",
        batch: 1,
        window: 4,
    },
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir(shape: &str) -> PathBuf {
    root().join("target/bench-train-memory").join(shape)
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

/// A model directory with random weights (candle's init hints) and a few episodes.
fn prepare(shape: &Shape) -> Result<()> {
    let dir = work_dir(shape.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config_json = std::fs::read(root().join(shape.config))?;
    let tokenizer_json = std::fs::read(root().join(shape.tokenizer))?;
    let backbone = Kosmos2Config::from_file(root().join(shape.config))?;
    let tokenizer = PromptTokenizer::from_file(&root().join(shape.tokenizer))?;
    let cfg = PolicyConfig::native(shape.window, 2, 1.0, 0.4);
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    Policy::new(cfg.clone(), &backbone, tokenizer, vb)?;
    let tensors: HashMap<_, _> = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("var map poisoned"))?
        .iter()
        .map(|(n, v)| {
            // Layer norms' scales start at 1 as in PyTorch (candle's default hint is 0, which
            // zeroes the vision features and makes their L2 normalisation's gradient NaN).
            let t = v.as_tensor();
            let t = if n.ends_with(".weight") && t.rank() == 1 {
                t.ones_like()?
            } else {
                t.clone()
            };
            Ok((n.clone(), t))
        })
        .collect::<Result<_>>()?;
    save_model_dir(
        &dir.join("model"),
        &config_json,
        &tokenizer_json,
        &cfg,
        &tensors,
    )?;
    let data = dir.join("episodes");
    std::fs::create_dir_all(&data)?;
    // Enough windows for two batches.
    for e in 0..2 * shape.batch {
        let opts = WriteOptions::default()
            .gzip_level(None)
            .channel_order(ChannelOrder::Rgb)
            .instruction(Some("go to the red box".into()));
        let mut w = EpisodeWriter::create(&data, &format!("ep{e:02}"), opts)?;
        for t in 0..shape.window {
            let ev = if t == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            let frame = image::RgbImage::from_fn(24, 24, |x, y| {
                image::Rgb([(x * 10) as u8, (y * 10) as u8, (e * 40) as u8])
            });
            w.push(&frame, [0.1, 0.0, -0.1], ev)?;
        }
        w.finish(shape.window as f64 * 0.4)?;
    }
    std::fs::write(dir.join("train.yaml"), config(shape))?;
    Ok(())
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
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let (shape, strategy) = (&args[i + 1], &args[i + 2]);
        let shape = SHAPES
            .iter()
            .find(|s| s.name == shape)
            .context("unknown shape")?;
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
        prepare(shape)?;
        for rung in LADDER {
            let out = Command::new(&exe)
                .args(["--case", shape.name, rung.strategy_name()])
                .env("RUST_LOG", "warn")
                .output()?;
            if !out.status.success() {
                bail!(
                    "{} {}: {}",
                    shape.name,
                    rung.name(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(
                line.lines()
                    .rev()
                    .find(|l| l.starts_with('{'))
                    .unwrap_or("{}"),
            )?;
            let mib = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64;
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
