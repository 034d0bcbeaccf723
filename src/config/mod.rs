//! Typed configuration: node parameters (YAML defaults in `config/`) and the training config.

pub mod train;

pub use train::{TrainConfig, TrainSetup};
