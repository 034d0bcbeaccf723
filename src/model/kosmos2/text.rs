//! The Magneto (sub-LN) text decoder (`text_model.model.*`), after
//! transformers' `Kosmos2TextTransformer`, run without KV cache on full
//! sequences given as embeddings.

use candle_core::{bail, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::{Activation, Kosmos2TextConfig};
use super::layers::{causal_mask, linear, AdapterFactory, Attention, LayerNorm, Linear};
use super::train_mode::TrainMode;
use crate::model::fused;
use crate::model::gemm::WeightFormat;
use std::sync::Arc;

/// `fc1` → activation → `ffn_layernorm` → `fc2`.
#[derive(Debug, Clone)]
struct Ffn {
    fc1: Linear,
    fc2: Linear,
    ffn_layernorm: LayerNorm,
    act: Activation,
    /// `activation_dropout` after the activation, `dropout` after `fc2` (train mode).
    dropout: (f64, f64),
    train: Arc<TrainMode>,
}

impl Ffn {
    fn new(cfg: &Kosmos2TextConfig, train: &Arc<TrainMode>, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.embed_dim, cfg.ffn_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.ffn_dim, cfg.embed_dim, vb.pp("fc2"))?,
            ffn_layernorm: LayerNorm::new(cfg.ffn_dim, cfg.layer_norm_eps, vb.pp("ffn_layernorm"))?,
            act: cfg.activation_function,
            dropout: (cfg.activation_dropout, cfg.dropout),
            train: train.clone(),
        })
    }

    fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.fc1.pack(format)?;
        self.fc2.pack(format)
    }

    fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        self.fc1.adapt(&format!("{prefix}.fc1"), make)?;
        self.fc2.adapt(&format!("{prefix}.fc2"), make)
    }
}

impl Module for Ffn {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward_act(xs, self.act)?;
        let h = self.train.dropout(&h, self.dropout.0)?;
        let h = self.ffn_layernorm.forward(&h)?.apply(&self.fc2)?;
        self.train.dropout(&h, self.dropout.1)
    }
}

/// `x + self_attn(self_attn_layer_norm(x))`, then `x + ffn(final_layer_norm(x))`.
#[derive(Debug, Clone)]
struct Block {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: Ffn,
    final_layer_norm: LayerNorm,
    /// `dropout` on the attention output (train mode).
    dropout: f64,
    train: Arc<TrainMode>,
}

impl Block {
    fn new(cfg: &Kosmos2TextConfig, train: &Arc<TrainMode>, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.embed_dim, cfg.layer_norm_eps);
        let attn_dropout = (cfg.attention_dropout, train.clone());
        Ok(Self {
            self_attn: Attention::new(
                d,
                cfg.attention_heads,
                Some(eps),
                attn_dropout,
                vb.pp("self_attn"),
            )?,
            self_attn_layer_norm: LayerNorm::new(d, eps, vb.pp("self_attn_layer_norm"))?,
            ffn: Ffn::new(cfg, train, vb.pp("ffn"))?,
            final_layer_norm: LayerNorm::new(d, eps, vb.pp("final_layer_norm"))?,
            dropout: cfg.dropout,
            train: train.clone(),
        })
    }

    fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.self_attn.pack(format, true)?;
        self.ffn.pack(format)
    }

    fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        self.self_attn.adapt(&format!("{prefix}.self_attn"), make)?;
        self.ffn.adapt(&format!("{prefix}.ffn"), make)
    }

    /// Updates rows `first..` of `xs (B, L, D)` → `(B, L - first, D)`; keys and values still come
    /// from every row. `mask`: the causal mask's rows `first..`, `(L - first, L)`.
    fn forward(&self, xs: &Tensor, mask: &Tensor, first: usize) -> Result<Tensor> {
        let len = xs.dim(1)?;
        let h = self.self_attn_layer_norm.forward(xs)?;
        let rows = |t: &Tensor| t.narrow(1, first, len - first)?.contiguous();
        let attn = self.self_attn.forward_self(&h, first, Some(mask))?;
        let xs = (rows(xs)? + self.train.dropout(&attn, self.dropout)?)?;
        let h = self.final_layer_norm.forward(&xs)?.apply(&self.ffn)?;
        xs + h
    }
}

/// Rows `padding_idx + 1 ..= padding_idx + len` of fairseq/M2M100's sinusoidal
/// table: `[sin(p·f_i) | cos(p·f_i)]` with `f_i = exp(-i·ln(10000)/(half-1))`,
/// zero-padded for odd widths. Computed in f32 like transformers.
fn sinusoidal_positions(
    len: usize,
    dim: usize,
    padding_idx: usize,
    dev: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let step = (10000f32).ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut table = Vec::with_capacity(len * dim);
    for p in (padding_idx + 1)..(padding_idx + 1 + len) {
        let angles = freqs.iter().map(|f| p as f32 * f);
        table.extend(angles.clone().map(f32::sin));
        table.extend(angles.map(f32::cos));
        if dim % 2 == 1 {
            table.push(0.0);
        }
    }
    Tensor::from_vec(table, (len, dim), dev)
}

/// `text_model.model`: scaled embeddings + positions → causal blocks → `layer_norm`.
#[derive(Debug, Clone)]
pub(crate) struct TextTransformer {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    layer_norm: LayerNorm,
    embed_dim: usize,
    embed_scale: f64,
    padding_idx: usize,
    dropout: f64,
    train: Arc<TrainMode>,
}

impl TextTransformer {
    pub(crate) fn new(
        cfg: &Kosmos2TextConfig,
        train: &Arc<TrainMode>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb_layers = vb.pp("layers");
        let layers = (0..cfg.layers)
            .map(|i| Block::new(cfg, train, vb_layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(
                cfg.vocab_size,
                cfg.embed_dim,
                vb.pp("embed_tokens"),
            )?,
            layers,
            layer_norm: LayerNorm::new(cfg.embed_dim, cfg.layer_norm_eps, vb.pp("layer_norm"))?,
            embed_dim: cfg.embed_dim,
            embed_scale: cfg.embed_scale(),
            padding_idx: cfg.pad_token_id,
            dropout: cfg.dropout,
            train: train.clone(),
        })
    }

    /// Repacks the decoder's linear weights for CPU inference ([`Linear::pack`]).
    pub(crate) fn pack(&mut self, format: WeightFormat) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.pack(format))
    }

    /// Adapters on every decoder linear (`<prefix>.layers.<i>.…`).
    pub(crate) fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.adapt(&format!("{prefix}.layers.{i}"), make)?;
        }
        Ok(())
    }

    /// Unscaled word embeddings of `input_ids` (any shape of integer ids).
    pub(crate) fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let table = self.embed_tokens.embeddings();
        if table.track_op() && fused::applies(&[table]) {
            return fused::embedding(table, input_ids);
        }
        self.embed_tokens.forward(input_ids)
    }

    /// `(B, L, D)` unscaled embeddings → last hidden state `(B, L, D)`.
    pub(crate) fn forward(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        self.decode(inputs_embeds, false)
    }

    /// `(B, L, D)` unscaled embeddings → last hidden state of the last position `(B, D)`.
    pub(crate) fn forward_last(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        self.decode(inputs_embeds, true)?.squeeze(1)
    }

    /// Last hidden state `(B, L, D)`, or only its last row `(B, 1, D)` when `last_only`.
    fn decode(&self, inputs_embeds: &Tensor, last_only: bool) -> Result<Tensor> {
        let (_, len, d) = inputs_embeds.dims3()?;
        if d != self.embed_dim || len == 0 {
            bail!(
                "inputs_embeds must be (batch, len >= 1, {}), got {:?}",
                self.embed_dim,
                inputs_embeds.dims()
            );
        }
        let dev = inputs_embeds.device();
        let positions =
            sinusoidal_positions(len, d, self.padding_idx, dev)?.to_dtype(inputs_embeds.dtype())?;
        let mut xs = (inputs_embeds * self.embed_scale)?.broadcast_add(&positions)?;
        // transformers applies `dropout` here twice (`forward_embedding`, then `forward`).
        for _ in 0..2 {
            xs = self.train.dropout(&xs, self.dropout)?;
        }
        let mask = causal_mask(len, dev)?;
        let n_layers = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            // Causal: nothing after the last layer reads its other rows, so skip them there.
            let first = if last_only && i + 1 == n_layers {
                len - 1
            } else {
                0
            };
            let (layer, mask) = (layer.clone(), mask.narrow(0, first, len - first)?);
            xs = self
                .train
                .checkpoint(&xs, move |xs| layer.forward(xs, &mask, first))?;
        }
        if last_only {
            xs = xs.narrow(1, xs.dim(1)? - 1, 1)?; // already one row unless there are no layers
        }
        self.layer_norm.forward(&xs)
    }
}
