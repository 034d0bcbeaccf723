//! The memory planner's counts per model part: floats a transformer layer keeps for backward,
//! what the LSTM head keeps, LoRA's parameters; [`super::estimate`] adds them up.

use crate::model::kosmos2::Kosmos2Config;
use crate::model::LstmSpec;

/// Floats kept per frame by one transformer layer whose input is tracked (the training ops of
/// `model::fused`: each keeps its output; an op's inputs are the previous ops' outputs).
pub(super) struct LayerShape {
    /// Tokens the layer sees.
    pub(super) seq: u64,
    pub(super) dim: u64,
    pub(super) ffn: u64,
    pub(super) heads: u64,
    /// Tensors of `seq × dim`, `seq × ffn` and `heads × seq²` floats kept (dropout masks are drawn
    /// again in the backward, not kept).
    pub(super) counts: (f64, f64, f64),
}

impl LayerShape {
    pub(super) fn floats(&self) -> u64 {
        let (a, b, c) = self.counts;
        let (seq, dim, ffn, heads) = (
            self.seq as f64,
            self.dim as f64,
            self.ffn as f64,
            self.heads as f64,
        );
        (a * seq * dim + b * seq * ffn + c * heads * seq * seq).round() as u64
    }
}

fn dropout_on(p: f64) -> f64 {
    f64::from(u8::from(p > 0.0))
}

/// Text decoder layer: two layer norms, q/k/v, the attention op's output and probabilities, the
/// inner attention norm, out_proj, dropout, the residual; fc1 + GELU keeps its pre-activation and
/// output, the activation dropout and the FFN norm theirs, then fc2, dropout, the residual.
pub(super) fn text_layer(cfg: &Kosmos2Config, seq: usize) -> LayerShape {
    let t = &cfg.text_config;
    let (d, act) = (dropout_on(t.dropout), dropout_on(t.activation_dropout));
    LayerShape {
        seq: seq as u64,
        dim: t.embed_dim as u64,
        ffn: t.ffn_dim as u64,
        heads: t.attention_heads as u64,
        counts: (10.0 + 2.0 * d, 3.0 + act, 1.0),
    }
}

/// CLIP vision layer: two layer norms, q/k/v, attention (no mask or inner norm), out_proj, two
/// residuals, fc1 + quick-GELU (pre-activation and output), fc2.
pub(super) fn vision_layer(cfg: &Kosmos2Config) -> LayerShape {
    let v = &cfg.vision_config;
    LayerShape {
        seq: v.num_patches() as u64 + 1,
        dim: v.hidden_size as u64,
        ffn: v.intermediate_size as u64,
        heads: v.num_attention_heads as u64,
        counts: (10.0, 2.0, 1.0),
    }
}

/// Floats the LSTM head keeps for `frames` (batch × window) frames: per layer the input
/// projections (`4H`), the recurrence op's gates (`4H`), cells and `[h | c]` output (`3H`), and its
/// backward's gate gradients (`4H`). Its weights' gradients are added in place (counted with the
/// gradients).
pub(super) fn lstm_kept(head: &LstmSpec, frames: usize) -> u64 {
    (head.num_layers * frames * 15 * head.hidden_size) as u64
}

/// LoRA parameters: `r × (in + out)` per backbone linear (peft's "all-linear" minus the head).
pub(super) fn lora_params(cfg: &Kosmos2Config, r: usize) -> u64 {
    let (t, v) = (&cfg.text_config, &cfg.vision_config);
    let (d, f, dv, fv) = (t.embed_dim, t.ffn_dim, v.hidden_size, v.intermediate_size);
    let text = t.layers * (4 * 2 * d + 2 * (d + f));
    let vision = v.num_hidden_layers * (4 * 2 * dv + 2 * (dv + fv));
    // image_to_text_projection: dense (dv → d) and its cross-attention q/k/v/out.
    let projection = dv + d + 4 * 2 * d;
    (r * (text + vision + projection)) as u64
}
