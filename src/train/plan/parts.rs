//! The memory planner's counts per model part: floats a transformer layer keeps for backward,
//! what the LSTM head's backward holds, LoRA's parameters; [`super::estimate`] adds them up.

use crate::model::kosmos2::Kosmos2Config;
use crate::model::LstmSpec;

/// Floats kept per frame by one transformer layer whose input is tracked.
pub(super) struct LayerShape {
    /// Tokens the layer sees.
    pub(super) seq: u64,
    pub(super) dim: u64,
    pub(super) ffn: u64,
    pub(super) heads: u64,
    /// Tensors of `seq × dim`, `seq × ffn` and `heads × seq²` floats kept.
    pub(super) counts: (u64, u64, u64),
}

impl LayerShape {
    pub(super) fn floats(&self) -> u64 {
        let (a, b, c) = self.counts;
        a * self.seq * self.dim + b * self.seq * self.ffn + c * self.heads * self.seq * self.seq
    }
}

fn dropout_on(p: f64) -> u64 {
    u64::from(p > 0.0)
}

/// Text decoder layer: each layer norm keeps its output, linears keep matmul + bias outputs, q is
/// scaled, q/k/v/kᵀ and the merged heads are copies, scores, masked scores and probabilities are
/// `heads × seq²`; Kosmos-2 adds an inner attention layer norm and an FFN layer norm; dropout
/// keeps its output (and a bit mask).
pub(super) fn text_layer(cfg: &Kosmos2Config, seq: usize) -> LayerShape {
    let t = &cfg.text_config;
    let (d, a, act) = (
        dropout_on(t.dropout),
        dropout_on(t.attention_dropout),
        dropout_on(t.activation_dropout),
    );
    LayerShape {
        seq: seq as u64,
        dim: t.embed_dim as u64,
        ffn: t.ffn_dim as u64,
        heads: t.attention_heads as u64,
        counts: (22 + 2 * d, 4 + act, 3 + a),
    }
}

/// CLIP vision layer: two layer norms, attention without mask or inner norm, quick-GELU.
pub(super) fn vision_layer(cfg: &Kosmos2Config) -> LayerShape {
    let v = &cfg.vision_config;
    let a = dropout_on(v.attention_dropout);
    LayerShape {
        seq: v.num_patches() as u64 + 1,
        dim: v.hidden_size as u64,
        ffn: v.intermediate_size as u64,
        heads: v.num_attention_heads as u64,
        counts: (21, 3, 2 + a),
    }
}

/// Floats the LSTM head's backward holds at its peak besides the weights' gradients, for a window
/// of `window` steps. Measured on the tiny shape, where the head is the whole backward (H 1024 × 4
/// layers: window 2 / 4 / 8 → 117 / 184 / 319 MiB live, batch 1 and 2 alike): each layer's input
/// weight gradient (`4H × in`, once: the input projection is one matmul over the window) and two
/// recurrent-weight-sized (`4H × H`) buffers per step, as candle's matmul backward computes the
/// recurrent weight's whole gradient at every step and sums it into a fresh tensor.
pub(super) fn lstm_backward(head: &LstmSpec, input: usize, window: usize) -> u64 {
    let (h, layers, input) = (
        head.hidden_size as u64,
        head.num_layers as u64,
        input as u64,
    );
    let inputs = 4 * h * (input + layers.saturating_sub(1) * h);
    inputs + 2 * window as u64 * 4 * h * h
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lstm_backward_matches_its_measurement() {
        // Live MiB beyond the gradients after the tiny shape's backward (RoboVLMs' 1024 × 4 head,
        // 36-wide features), windows 2, 4 and 8.
        for (window, measured) in [(2, 117.0), (4, 184.0), (8, 319.0)] {
            let mib =
                (4 * lstm_backward(&LstmSpec::default(), 36, window)) as f64 / (1u64 << 20) as f64;
            assert!((mib / measured - 1.0).abs() < 0.06, "{window}: {mib}");
        }
    }
}
