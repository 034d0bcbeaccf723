//! `mobile_vla plan`: the memory planner's estimate per strategy and the one `train --strategy
//! auto` would take.

use crate::config::TrainConfig;
use crate::train::plan::{self, ModelSizes, Workload};
use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Training config: the project's YAML or a RoboVLMs JSON.
    #[arg(long)]
    pub config: PathBuf,
    /// Model directory, or a Hugging Face Kosmos-2 folder (the default head is counted).
    #[arg(long)]
    pub model: PathBuf,
    /// Memory to fit in, e.g. 8GiB (default: this machine's available memory).
    #[arg(long, value_parser = plan::parse_bytes)]
    pub budget: Option<u64>,
}

pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let cfg = TrainConfig::from_file(&args.config)?;
    let (backbone, policy, sizes) = ModelSizes::read(&args.model)?;
    let budget = match args.budget {
        Some(b) => b,
        None => plan::available_memory()
            .context("cannot read MemAvailable from /proc/meminfo; pass --budget")?,
    };
    // The config's window, else the model directory's, else the fork's 16.
    let window = cfg
        .window_size
        .or(policy.map(|p| p.window_size))
        .unwrap_or(16);
    let work = Workload {
        batch: cfg.batch_size,
        window,
        prompt_tokens: plan::PROMPT_TOKENS,
        accumulate: cfg.accumulate_grad_batches,
    };
    let p = plan::plan(&cfg, &backbone, &sizes, work, budget);
    print!("{}", p.table());
    if let Some(note) = plan::precision_note(cfg.precision) {
        println!("{note}");
    }
    let chosen = p.chosen()?;
    println!(
        "{} (`train --strategy auto` runs `--strategy {}`)",
        p.reason(),
        chosen
            .rung
            .strategy()
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}
