//! Kosmos-2 (`microsoft/kosmos-2-patch14-224`) as the VLA backbone, matching
//! transformers' `Kosmos2ForConditionalGeneration` numerically.
//!
//! Weights are addressed by their Hugging Face names (`vision_model.model.…`,
//! `image_to_text_projection.…`, `text_model.model.…`); the language-model
//! head is not needed for features and is not loaded.
//! Reference: transformers `models/kosmos2/modeling_kosmos2.py`.

mod config;
mod error;
mod layers;
mod projection;
mod text;
mod train_mode;
mod vision;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::model::gemm::WeightFormat;

pub use config::{Activation, Kosmos2Config, Kosmos2TextConfig, Kosmos2VisionConfig};
pub use error::Kosmos2Error;
pub use layers::{AdapterFactory, LinearAdapter};
pub use train_mode::TrainMode;

use projection::ImageToTextProjection;
use text::TextTransformer;
use vision::VisionTransformer;

/// The Kosmos-2 backbone: vision tower, image-to-text resampler, text decoder.
#[derive(Debug, Clone)]
pub struct Kosmos2 {
    vision: VisionTransformer,
    projection: ImageToTextProjection,
    text: TextTransformer,
    cfg: Kosmos2Config,
    dtype: DType,
    train: Arc<TrainMode>,
}

impl Kosmos2 {
    /// Builds the model (dropout off); `vb` sits at the checkpoint root (HF names).
    pub fn new(cfg: &Kosmos2Config, vb: VarBuilder) -> Result<Self> {
        let train = Arc::new(TrainMode::default());
        Ok(Self {
            vision: VisionTransformer::new(
                &cfg.vision_config,
                &train,
                vb.pp("vision_model").pp("model"),
            )?,
            projection: ImageToTextProjection::new(cfg, &train, vb.pp("image_to_text_projection"))?,
            text: TextTransformer::new(&cfg.text_config, &train, vb.pp("text_model").pp("model"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            train,
        })
    }

    /// Train-mode dropout switch (`dropout`, `attention_dropout`, `activation_dropout` of the
    /// config, placed as transformers does); off after construction.
    pub fn train_mode(&self) -> &Arc<TrainMode> {
        &self.train
    }

    /// Loads weights from safetensors files (memory-mapped), converting to
    /// `dtype`. Errors name the files and, from candle, the tensor.
    pub fn load(
        cfg: &Kosmos2Config,
        files: &[impl AsRef<Path>],
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, Kosmos2Error> {
        let wrap = |cause| Kosmos2Error::Weights {
            files: files
                .iter()
                .map(|f| f.as_ref().display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            cause,
        };
        cfg.validate()?;
        // SAFETY: the files are mapped read-only; like every mmap reader we rely
        // on nobody truncating or rewriting a checkpoint while it is loaded.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(wrap)?;
        Self::new(cfg, vb).map_err(wrap)
    }

    /// Loads a Hugging Face model folder: `config.json` plus `model.safetensors`
    /// or the shards listed in `model.safetensors.index.json`.
    pub fn from_pretrained_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, Kosmos2Error> {
        let dir = dir.as_ref();
        let cfg = Kosmos2Config::from_file(dir.join("config.json"))?;
        let files = weight_files(dir)?;
        if files.is_empty() {
            return Err(Kosmos2Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Self::load(&cfg, &files, dtype, device)
    }

    /// Repacks every linear weight into the CPU inference GEMM's layout (`model::gemm`, x86-64
    /// with AVX2 + FMA; a no-op elsewhere): f32 weights into `format`, half-precision ones only
    /// into [`WeightFormat::I16`]. Inference only: gradients no longer reach the packed weights.
    pub fn pack_for_inference(&mut self, format: WeightFormat) -> Result<()> {
        self.vision.pack(format)?;
        self.projection.pack(format)?;
        self.text.pack(format)
    }

    /// Gives every linear layer of the backbone (vision tower, projection, text decoder; the
    /// unloaded `lm_head` excepted) `make(name, weight)`'s adapter, if any; `name` is the layer's
    /// Hugging Face module name. Training only, before any packing.
    pub fn adapt_linears(&mut self, make: &mut AdapterFactory) -> Result<()> {
        self.vision.adapt("vision_model.model", make)?;
        self.projection.adapt("image_to_text_projection", make)?;
        self.text.adapt("text_model.model", make)
    }

    pub fn config(&self) -> &Kosmos2Config {
        &self.cfg
    }

    /// `(B, 3, H, W)` pixels → `(B, 1 + patches, Dv)` (257 tokens for
    /// ViT-L/14 at 224) after `post_layernorm`, before L2 normalisation.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.forward(&pixel_values.to_dtype(self.dtype)?)
    }

    /// `(B, 3, H, W)` pixels → `(B, latent_query_num, D_text)`: vision
    /// features, L2-normalised per token, through `image_to_text_projection`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let features = self.vision_features(pixel_values)?;
        self.projection.forward(&l2_normalize(&features)?)
    }

    /// Raw (unscaled) word embeddings of token ids.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.text.embed_tokens(input_ids)
    }

    /// `(B, L, D)` unscaled embeddings → last hidden state after the final
    /// `layer_norm`. Every position is scaled by `embed_scale`, sinusoidal
    /// positions start at `pad_token_id + 1`, attention is causal.
    pub fn text_hidden_states(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        self.text.forward(&inputs_embeds.to_dtype(self.dtype)?)
    }

    /// The last position's row of [`Self::text_hidden_states`], `(B, D)`, computing only that
    /// row in the last decoder layer (the next-token / `[ACT]` read-out).
    pub fn last_hidden_state(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        self.text.forward_last(&inputs_embeds.to_dtype(self.dtype)?)
    }
}

/// The safetensors weight files of a Hugging Face model folder: `model.safetensors`, else the
/// shards `model.safetensors.index.json` lists (sorted, each once), else none.
pub fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, Kosmos2Error> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(vec![]);
    }
    let bad = |message: String| Kosmos2Error::WeightIndex {
        path: index.clone(),
        message,
    };
    let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = std::collections::BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name")))?;
        shards.insert(dir.join(file));
    }
    Ok(shards.into_iter().collect())
}

/// `torch.nn.functional.normalize(x, dim=-1)`: `x / max(‖x‖₂, 1e-12)`.
fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    xs.broadcast_div(&norm)?.to_dtype(dtype)
}
