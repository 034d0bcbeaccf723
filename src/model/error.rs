//! Errors of the policy, its model directory and checkpoint import. Each names the file, field or
//! tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Tensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: tensors not used by the model (remove them or fix their names): {names:?}")]
    UnusedTensors { path: PathBuf, names: Vec<String> },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("tensor `{name}` has shape {got:?} but the model needs {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("the policy produced a non-finite action at chunk step {step}: {values:?}")]
    NonFiniteAction { step: usize, values: Vec<f32> },
    #[error(transparent)]
    Backbone(Box<crate::model::kosmos2::Kosmos2Error>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
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
