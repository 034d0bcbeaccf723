//! The CLIP ViT image tower (`vision_model.model.*`), after transformers'
//! `Kosmos2VisionTransformer` (a copy of `CLIPVisionTransformer`).

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, Kosmos2VisionConfig};
use super::layers::{linear, AdapterFactory, Attention, LayerNorm, Linear};
use super::train_mode::TrainMode;
use crate::model::gemm::WeightFormat;
use std::sync::Arc;

/// Class token + strided-conv patch embeddings + learned positions.
///
/// The conv has stride == kernel, so it is computed as "cut into patches, then
/// matmul" with the conv weight flattened to `(D, C·p·p)`: same numbers, and
/// it runs in bf16 on CPU, where candle's conv2d has no bf16 kernel.
#[derive(Debug, Clone)]
struct VisionEmbeddings {
    class_embedding: Tensor,
    /// `patch_embedding.weight` as `(C·p·p, D)`.
    patch_weight: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
}

impl VisionEmbeddings {
    fn new(cfg: &Kosmos2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let patch_weight = vb
            .pp("patch_embedding")
            .get((d, c, p, p), "weight")?
            .reshape((d, c * p * p))?
            .t()?;
        Ok(Self {
            class_embedding: vb.get(d, "class_embedding")?,
            patch_weight,
            position_embedding: vb
                .pp("position_embedding")
                .get((cfg.num_positions(), d), "weight")?,
            patch_size: p,
        })
    }
}

impl Module for VisionEmbeddings {
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, _) = pixel_values.dims4()?;
        let d = self.class_embedding.dim(0)?;
        let p = self.patch_size;
        // A strided conv ignores the remainder rows/columns; so do we.
        let g = h / p;
        // (B, C, g·p, g·p) → (B, g, g, C, p, p) → (B, g·g, C·p·p) → (B, g·g, D)
        let patches = pixel_values
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?
            .broadcast_matmul(&self.patch_weight)?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// Pre-LN block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(cfg: &Kosmos2VisionConfig, train: &Arc<TrainMode>, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let dropout = (cfg.attention_dropout, train.clone());
        Ok(Self {
            self_attn: Attention::new(
                d,
                cfg.num_attention_heads,
                None,
                dropout,
                vb.pp("self_attn"),
            )?,
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            act: cfg.hidden_act,
        })
    }

    fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.self_attn.pack(format, true)?;
        self.fc1.pack(format)?;
        self.fc2.pack(format)
    }

    fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        self.self_attn.adapt(&format!("{prefix}.self_attn"), make)?;
        self.fc1.adapt(&format!("{prefix}.mlp.fc1"), make)?;
        self.fc2.adapt(&format!("{prefix}.mlp.fc2"), make)
    }
}

impl Module for EncoderLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward_self(&self.layer_norm1.forward(xs)?, 0, None)?;
        let xs = (xs + h)?;
        let h = self
            .fc1
            .forward_act(&self.layer_norm2.forward(&xs)?, self.act)?;
        let h = self.fc2.forward(&h)?;
        xs + h
    }
}

/// `vision_model.model`: embeddings → `pre_layrnorm` → encoder → `post_layernorm`.
#[derive(Debug, Clone)]
pub(crate) struct VisionTransformer {
    embeddings: VisionEmbeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    num_channels: usize,
    image_size: usize,
    train: Arc<TrainMode>,
}

impl VisionTransformer {
    pub(crate) fn new(
        cfg: &Kosmos2VisionConfig,
        train: &Arc<TrainMode>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, train, vb_layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: VisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            pre_layrnorm: LayerNorm::new(cfg.hidden_size, eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: LayerNorm::new(cfg.hidden_size, eps, vb.pp("post_layernorm"))?,
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
            train: train.clone(),
        })
    }

    /// Repacks the encoder's linear weights for CPU inference ([`Linear::pack`]).
    pub(crate) fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.pack(format))
    }

    /// Adapters on every encoder linear (`<prefix>.encoder.layers.<i>.…`).
    pub(crate) fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.adapt(&format!("{prefix}.encoder.layers.{i}"), make)?;
        }
        Ok(())
    }

    /// `(B, C, H, W)` → `(B, 1 + patches, Dv)`: every token through
    /// `post_layernorm`, as `Kosmos2ForConditionalGeneration` uses them.
    pub(crate) fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "pixel_values must be (batch, {}, {s}, {s}), got {:?}",
                self.num_channels,
                pixel_values.dims(),
                s = self.image_size
            ))
        })?;
        if (c, h, w) != (self.num_channels, self.image_size, self.image_size) {
            bail!(
                "pixel_values must be (batch, {}, {s}, {s}) for this checkpoint, got {:?}",
                self.num_channels,
                pixel_values.dims(),
                s = self.image_size
            );
        }
        let mut xs = self
            .embeddings
            .forward(pixel_values)?
            .apply(&self.pre_layrnorm)?;
        for layer in &self.layers {
            let layer = layer.clone();
            xs = self.train.checkpoint(&xs, move |xs| layer.forward(xs))?;
        }
        self.post_layernorm.forward(&xs)
    }
}
