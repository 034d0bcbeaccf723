//! The protocol of the benches that run each case in its own process (so that its peak RSS is its
//! own): the thread settings the children inherit, and the one JSON line each prints.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Read by candle on first use; children inherit them. Matmuls use `RAYON_NUM_THREADS` (default 2,
/// also PyTorch's thread count in the benches); candle's element-wise pool stays single-threaded
/// unless `CANDLE_NUM_THREADS` says otherwise, because its workers spin-wait between ops, which
/// starves the matmul threads on a 2-core machine.
pub fn default_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs a case's child process and returns the last JSON line it printed on stdout.
pub fn run_json_child(mut cmd: Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no JSON line:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}
