//! `image_to_text_projection`: a perceiver-style resampler from vision tokens
//! to `latent_query_num` text-width tokens, after transformers'
//! `Kosmos2ImageToTextProjection`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::Kosmos2Config;
use super::layers::{linear, AdapterFactory, Attention, Linear};
use super::train_mode::TrainMode;
use crate::model::gemm::WeightFormat;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) struct ImageToTextProjection {
    dense: Linear,
    latent_query: Tensor,
    x_attn: Attention,
}

impl ImageToTextProjection {
    pub(crate) fn new(cfg: &Kosmos2Config, train: &Arc<TrainMode>, vb: VarBuilder) -> Result<Self> {
        let dt = cfg.text_config.embed_dim;
        let dropout = (cfg.text_config.attention_dropout, train.clone());
        Ok(Self {
            dense: linear(cfg.vision_config.hidden_size, dt, vb.pp("dense"))?,
            latent_query: vb.get((cfg.latent_query_num, dt), "latent_query")?,
            x_attn: Attention::new(
                dt,
                cfg.text_config.attention_heads,
                None,
                dropout,
                vb.pp("x_attn"),
            )?,
        })
    }

    pub(crate) fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.dense.pack(format)?;
        self.x_attn.pack(format, false)
    }

    /// Adapters on `dense` and the cross-attention's projections.
    pub(crate) fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        self.dense.adapt(&format!("{prefix}.dense"), make)?;
        self.x_attn.adapt(&format!("{prefix}.x_attn"), make)
    }

    /// `(B, N, Dv)` normalised vision tokens → `(B, latent_query_num, Dt)`.
    /// The latent queries attend to `cat[dense(x), latent_query]`.
    pub(crate) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let hidden = self.dense.forward(features)?;
        let b = hidden.dim(0)?;
        let (q, d) = self.latent_query.dims2()?;
        let queries = self
            .latent_query
            .unsqueeze(0)?
            .broadcast_as((b, q, d))?
            .contiguous()?;
        let key_values = Tensor::cat(&[&hidden, &queries], 1)?;
        self.x_attn.forward(&queries, &key_values, None)
    }
}
