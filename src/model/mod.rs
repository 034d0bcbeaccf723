//! The VLA model: Kosmos-2 backbone, action token, LSTM policy head.
pub mod checkpoint;
pub mod error;
pub(crate) mod gemm;
pub mod head;
pub mod kosmos2;
pub mod policy;
pub mod preprocess;
pub mod tokenizer;

pub use gemm::WeightFormat;
