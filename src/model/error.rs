//! Errors of the policy, its model directory and checkpoint import. Each names the file, field or
//! tensor at fault.
//!
//! A variant's message includes its cause's, so the cause is not also returned by `source()`:
//! chain printers (anyhow's `{:#}`, the CLI's `error:` line) would print it twice.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: {}", without_path(cause))]
    Tensors {
        path: PathBuf,
        cause: candle_core::Error,
    },
    #[error("{path}: tensors not used by the model (remove them or fix their names): {names:?}")]
    UnusedTensors { path: PathBuf, names: Vec<String> },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("the policy produced a non-finite action at chunk step {step}: {values:?}")]
    NonFiniteAction { step: usize, values: Vec<f32> },
    #[error(transparent)]
    Backbone(Box<crate::model::kosmos2::Kosmos2Error>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl From<crate::model::kosmos2::Kosmos2Error> for ModelError {
    fn from(e: crate::model::kosmos2::Kosmos2Error) -> Self {
        ModelError::Backbone(Box::new(e))
    }
}

/// candle's error without the path it wraps (ours names it already).
fn without_path(e: &candle_core::Error) -> &candle_core::Error {
    match e {
        candle_core::Error::WithPath { inner, .. } => without_path(inner),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_printers_show_each_cause_once() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let backbone = crate::model::kosmos2::Kosmos2Config::from_file("/nonexistent/config.json")
            .map(|_| ())
            .unwrap_err();
        for err in [
            ModelError::io("/nonexistent/policy.json", missing()),
            backbone.into(),
        ] {
            // What the CLI prints: anyhow's `{:#}` joins the source chain with ": ".
            let text = format!("{:#}", anyhow::Error::from(err));
            assert!(text.contains("/nonexistent/"), "{text}");
            assert_eq!(
                text.matches("not found").count() + text.matches("(os error 2)").count(),
                1,
                "{text}"
            );
        }
    }
}
