//! `mobile_vla model …` and `mobile_vla infer` (owned by the Model work).

use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {}

#[derive(Debug, Args)]
pub struct InferArgs {}

pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}

pub fn infer(_args: InferArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`mobile_vla infer` is not built yet")
}
