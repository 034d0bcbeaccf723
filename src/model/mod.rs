//! The VLA model: Kosmos-2 backbone, action token, LSTM policy head.
//!
//! Dependencies run one way: `config` (the `policy.json` types) ← `policy` ← `model_dir`
//! (loading and writing model directories) ← `import` / `export` (RoboVLMs checkpoints, read by
//! `robovlms`).
pub mod config;
pub mod error;
pub mod export;
pub(crate) mod fused;
pub(crate) mod gemm;
pub mod head;
pub mod import;
pub mod kosmos2;
pub mod model_dir;
pub mod policy;
pub mod preprocess;
pub mod robovlms;
pub mod tokenizer;

pub use config::{ActionSpec, LstmSpec, NormRange, PolicyConfig};
pub use fused::sink::SinkScope;
pub use gemm::WeightFormat;
pub use model_dir::LoadOptions;
pub use policy::{ActionChunk, Policy};

/// Keeps candle's element-wise thread pool at one thread unless `CANDLE_NUM_THREADS` says
/// otherwise. That pool spin-waits between ops and takes the cores the GEMM threads need: on 2
/// cores a full-shape f32 step took 4.4 s with it at 2 threads against 3.4 s at 1. Call at the
/// start of `main`, before any tensor op and while the process has one thread.
pub fn init_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
