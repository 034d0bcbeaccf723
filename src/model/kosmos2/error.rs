//! Errors raised while reading a Kosmos-2 config or checkpoint.

use std::path::PathBuf;

/// What went wrong loading Kosmos-2, naming the file, field or tensor involved. Messages include
/// their cause, which is therefore not also a `source()` (chain printers would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum Kosmos2Error {
    #[error("cannot read Kosmos-2 config {path}: {cause}")]
    ReadConfig {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("Kosmos-2 config {path} is not valid JSON: {cause}")]
    ConfigJson {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("Kosmos-2 config {path}: field `{field}`: {message}")]
    ConfigField {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A config value that parses but cannot describe a working model.
    #[error("invalid Kosmos-2 config: `{field}` {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error(
        "cannot load Kosmos-2 weights from {files}: {cause} \
         (is it a Kosmos2ForConditionalGeneration checkpoint matching the config?)"
    )]
    Weights {
        files: String,
        cause: candle_core::Error,
    },
    #[error(
        "no Kosmos-2 weights in {dir}: expected model.safetensors or model.safetensors.index.json"
    )]
    NoWeights { dir: PathBuf },
    #[error("bad safetensors index {path}: {message}")]
    WeightIndex { path: PathBuf, message: String },
}
