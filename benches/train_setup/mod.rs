//! What the training benches (`train_memory`, `train_speed`) share: the model shapes, a model
//! directory with random weights and generated episodes to train on.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use mobile_vla::data::episode::{EpisodeWriter, EventType, WriteOptions};
use mobile_vla::data::image::ChannelOrder;
use mobile_vla::model::kosmos2::Kosmos2Config;
use mobile_vla::model::model_dir::save_model_dir;
use mobile_vla::model::tokenizer::PromptTokenizer;
use mobile_vla::model::{Policy, PolicyConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Every episode's instruction.
pub const INSTRUCTION: &str = "go to the red box";

pub struct Shape {
    pub name: &'static str,
    /// Backbone config and tokenizer, relative to the repository root.
    pub config: &'static str,
    pub tokenizer: &'static str,
    pub batch: usize,
    pub window: usize,
}

pub const SHAPES: [Shape; 2] = [
    Shape {
        name: "tiny",
        config: "test/fixtures/policy/hf_robovlms7/config.json",
        tokenizer: "test/fixtures/policy/hf_robovlms7/tokenizer.json",
        batch: 2,
        window: 4,
    },
    Shape {
        name: "small",
        config: "benches/kosmos2-small.config.json",
        tokenizer: "test/fixtures/policy/native/tokenizer.json",
        batch: 1,
        window: 4,
    },
];

pub fn shape(name: &str) -> Result<&'static Shape> {
    SHAPES
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("unknown shape {name:?} (tiny, small)"))
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<bench>/<shape>`: the model, episodes and runs of one bench's shape.
pub fn work_dir(bench: &str, shape: &str) -> PathBuf {
    root().join("target").join(bench).join(shape)
}

/// Writes `<dir>/model` (random weights) and `<dir>/episodes` (`episodes` episodes of
/// `shape.window` frames: one training window each), replacing what `dir` held.
pub fn prepare(shape: &Shape, dir: &Path, episodes: usize) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    write_model(shape, &dir.join("model"))?;
    write_episodes(shape, &dir.join("episodes"), episodes)
}

/// A model directory of `shape` with random weights (candle's init hints, layer-norm scales 1).
pub fn write_model(shape: &Shape, model: &Path) -> Result<()> {
    let config_json = std::fs::read(root().join(shape.config))?;
    let tokenizer_json = std::fs::read(root().join(shape.tokenizer))?;
    let backbone = Kosmos2Config::from_file(root().join(shape.config))?;
    let tokenizer = PromptTokenizer::from_file(&root().join(shape.tokenizer))?;
    let cfg = PolicyConfig::native(shape.window, 2, 1.0, 0.4);
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    Policy::new(cfg.clone(), &backbone, tokenizer, vb)?;
    let tensors: HashMap<_, _> = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("var map poisoned"))?
        .iter()
        .map(|(n, v)| {
            // Layer norms' scales start at 1 as in PyTorch (candle's default hint is 0, which
            // zeroes the vision features and makes their L2 normalisation's gradient NaN).
            let t = v.as_tensor();
            let t = if n.ends_with(".weight") && t.rank() == 1 {
                t.ones_like()?
            } else {
                t.clone()
            };
            Ok((n.clone(), t))
        })
        .collect::<Result<_>>()?;
    save_model_dir(model, &config_json, &tokenizer_json, &cfg, &tensors)?;
    Ok(())
}

/// `episodes` episodes of `shape.window` frames (one training window each) in `data`.
pub fn write_episodes(shape: &Shape, data: &Path, episodes: usize) -> Result<()> {
    std::fs::create_dir_all(data)?;
    for e in 0..episodes {
        let opts = WriteOptions::default()
            .gzip_level(None)
            .channel_order(ChannelOrder::Rgb)
            .instruction(Some(INSTRUCTION.into()));
        let mut w = EpisodeWriter::create(data, &format!("ep{e:02}"), opts)?;
        for t in 0..shape.window {
            let ev = if t == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            let frame = image::RgbImage::from_fn(24, 24, |x, y| {
                image::Rgb([(x * 10) as u8, (y * 10) as u8, (e * 40) as u8])
            });
            w.push(&frame, [0.1, 0.0, -0.1], ev)?;
        }
        w.finish(shape.window as f64 * 0.4)?;
    }
    Ok(())
}

pub fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}
