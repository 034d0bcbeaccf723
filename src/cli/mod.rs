//! The `mobile_vla` command line. Each subcommand family lives in its own file.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod dataset;
pub mod model;
pub mod plan;
pub mod train;

#[derive(Debug, Parser)]
#[command(
    name = "mobile_vla",
    version,
    about = "Mobile VLA: record, fine-tune and serve a VLA policy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect, validate and import episodes.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Import, export and inspect model directories.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run frames through a policy and print the predicted action chunks as JSON.
    Infer(model::InferArgs),
    /// Fine-tune a model directory on a folder of episodes.
    Train(train::TrainArgs),
    /// Estimate each training strategy's peak memory and pick the strongest that fits.
    Plan(plan::PlanArgs),
}

/// Entry point shared by the binary: parses arguments, sets up logging, maps errors to exit codes.
pub fn main() -> ExitCode {
    crate::model::init_cpu_threads();
    crate::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dataset(cmd) => dataset::run(cmd),
        Command::Model(cmd) => model::run(cmd),
        Command::Infer(args) => model::infer(args),
        Command::Train(args) => train::run(args),
        Command::Plan(args) => plan::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::logging::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
