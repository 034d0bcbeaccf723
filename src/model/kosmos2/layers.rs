//! Building blocks shared by the Kosmos-2 towers.
//!
//! Written with plain differentiable candle ops: candle-nn's fused
//! `layer_norm`/`softmax_last_dim` kernels have no backward pass, and the
//! backbone is fine-tuned end to end.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

/// `nn.LayerNorm` (weight and bias). Statistics in f32 so bf16/f16 stay stable.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Additive causal mask `(len, len)`: 0 on and below the diagonal, f32::MIN
/// above (transformers uses `finfo(dtype).min`).
pub(crate) fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

/// Multi-head attention with q/k/v/out projections (with biases), as in
/// `Kosmos2VisionAttention` and `KosmosTextAttention`; the text variant adds
/// `inner_attn_ln` between the heads' concatenation and `out_proj`.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    inner_attn_ln: Option<LayerNorm>,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `inner_ln_eps`: `Some(eps)` loads `inner_attn_ln` (text self-attention).
    pub(crate) fn new(
        dim: usize,
        num_heads: usize,
        inner_ln_eps: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner_attn_ln = match inner_ln_eps {
            Some(eps) => Some(LayerNorm::new(dim, eps, vb.pp("inner_attn_ln"))?),
            None => None,
        };
        Ok(Self {
            q_proj: candle_nn::linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(dim, dim, vb.pp("out_proj"))?,
            inner_attn_ln,
            num_heads,
            head_dim: dim / num_heads,
        })
    }

    /// `(B, T, D)` → `(B, H, T, hd)`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `queries (B, Tq, D)` attend to `key_values (B, Tk, D)` (the queries
    /// themselves for self-attention); `mask` is additive, `(Tq, Tk)` f32.
    pub(crate) fn forward(
        &self,
        queries: &Tensor,
        key_values: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, tq, d) = queries.dims3()?;
        let kv = key_values.unwrap_or(queries);
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads(&(self.q_proj.forward(queries)? * scale)?)?;
        let k = self.split_heads(&self.k_proj.forward(kv)?)?;
        let v = self.split_heads(&self.v_proj.forward(kv)?)?;
        // (B, H, Tq, Tk); softmax in f32 for half-precision weights.
        let scores = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, tq, d))?;
        let out = match &self.inner_attn_ln {
            Some(ln) => ln.forward(&out)?,
            None => out,
        };
        self.out_proj.forward(&out)
    }
}
