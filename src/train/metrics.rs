//! `metrics.jsonl`: the run's metrics, one JSON object per line, and its rewind on `--resume`.

use super::trainer::{io_err, METRICS_FILE};
use super::TrainError;
use crate::fsutil::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `metrics.jsonl`, one JSON object per line, flushed per line.
pub(super) struct Metrics {
    file: std::fs::File,
    pub(super) lines: usize,
}

impl Metrics {
    pub(super) fn open(path: &Path, lines: usize) -> Result<Self, TrainError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self { file, lines })
    }

    pub(super) fn write(&mut self, v: &serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|source| TrainError::Io {
                path: PathBuf::from(METRICS_FILE),
                source,
            })?;
        self.lines += 1;
        Ok(())
    }
}

/// Keeps the first `n` lines of `path` (what the checkpoint had seen), atomically.
pub(super) fn truncate_lines(path: &Path, n: usize) -> Result<(), TrainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    write_atomic(path, |p| std::fs::write(p, kept)).map_err(io_err(path))?;
    Ok(())
}
