//! `mobile_vla dataset …` (owned by the Episodes work).

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
