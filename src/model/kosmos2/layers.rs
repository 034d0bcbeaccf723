//! Building blocks shared by the Kosmos-2 towers.
//!
//! candle-nn's fused `layer_norm`/`softmax_last_dim` kernels have no backward
//! pass, and the backbone is fine-tuned end to end: when an input is tracked
//! for gradients, f32 on the CPU runs [`fused`]'s training ops (which keep only
//! what their backward needs) and anything else plain differentiable candle
//! ops. When no input is tracked (inference, or frozen weights on detached
//! inputs) candle-nn's kernels run: one pass over the data instead of eight.

use std::sync::Arc;

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::train_mode::TrainMode;
use crate::model::fused::{self, needs_grad};
use crate::model::gemm::{self, Epilogue, PackedLinear, WeightFormat};

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
        if !needs_grad(&[xs, &self.weight, &self.bias]) {
            // The kernel accumulates in f32 whatever the storage dtype.
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        if fused::applies(&[xs, &self.weight, &self.bias]) {
            return fused::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
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

/// A trainable update added to a linear layer's output, `y = W·x + b + adapter(x)` (LoRA:
/// `train::lora`). Training only: a trained model directory holds the merged weights.
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    fn forward(&self, xs: &Tensor) -> Result<Tensor>;

    /// `base(xs) + self(xs)` as one op where the adapter has one for the case (a frozen base in
    /// training); none otherwise.
    fn forward_with_base(&self, _base: &candle_nn::Linear, _xs: &Tensor) -> Option<Result<Tensor>> {
        None
    }
}

/// Makes the adapter of the linear layer `name` (HF name, e.g. `text_model.model.layers.0.fc1`)
/// from its weight `(out, in)`, or none to leave it as it is.
pub type AdapterFactory<'a> =
    dyn FnMut(&str, &Tensor) -> Result<Option<Arc<dyn LinearAdapter>>> + 'a;

/// `nn.Linear` (with bias).
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// candle's matmul: trainable, any device and dtype.
    Plain(candle_nn::Linear),
    /// Repacked for the CPU inference GEMM ([`gemm`]); no gradients reach it.
    Packed(Arc<PackedLinear>),
    /// A (frozen) linear plus a training adapter.
    Adapted(candle_nn::Linear, Arc<dyn LinearAdapter>),
}

pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::Plain)
}

/// Whether [`gemm`] takes weight `w` in `format`: on a CPU that runs it, f32 weights in any format,
/// half-precision ones only into [`WeightFormat::I16`] (f32 panels would double their memory).
fn packable(w: &Tensor, format: WeightFormat) -> bool {
    let fits = w.dtype() == DType::F32 || format == WeightFormat::I16;
    fits && w.device().is_cpu() && gemm::supported()
}

impl Linear {
    /// Repacks the weight for [`gemm`] where [`packable`]; a no-op otherwise.
    pub(crate) fn pack(&mut self, format: WeightFormat) -> Result<()> {
        if let Self::Plain(l) = self {
            if packable(l.weight(), format) {
                *self = Self::Packed(Arc::new(PackedLinear::new(l.weight(), l.bias(), format)?));
            }
        }
        Ok(())
    }

    /// Gives the layer `make(name, weight)`'s adapter, if any. Before packing only.
    pub(crate) fn adapt(&mut self, name: &str, make: &mut AdapterFactory) -> Result<()> {
        let Self::Plain(l) = self else {
            bail!("linear layer `{name}`: adapters go on an unpacked, unadapted layer");
        };
        if let Some(adapter) = make(name, l.weight())? {
            *self = Self::Adapted(l.clone(), adapter);
        }
        Ok(())
    }

    /// `act(self(xs))`; packed, the GEMM threads apply the activation to their own columns.
    pub(crate) fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        let epilogue = match act {
            Activation::Gelu => Some(Epilogue::GeluErf),
            Activation::QuickGelu => Some(Epilogue::QuickGelu),
            _ => None,
        };
        match (self, epilogue) {
            (Self::Packed(p), Some(e)) if !needs_grad(&[xs]) => p.forward_act(xs, Some(e)),
            (Self::Plain(l), Some(e)) => match l.bias() {
                Some(b)
                    if needs_grad(&[xs, l.weight(), b]) && fused::applies(&[xs, l.weight(), b]) =>
                {
                    fused::linear_act(xs, l.weight(), b, Some(e))
                }
                _ => act.forward(&plain_forward(l, xs)?),
            },
            _ => {
                let ys = self.forward(xs)?;
                match epilogue {
                    Some(e) if needs_grad(&[&ys]) && fused::applies(&[&ys]) => {
                        fused::activation(&ys, e)
                    }
                    _ => act.forward(&ys),
                }
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(p) if needs_grad(&[xs]) => {
                candle_core::bail!(
                    "a linear layer packed for inference got an input that needs gradients; \
                     load the policy with `packing: None` to fine-tune it ({p:?})"
                )
            }
            Self::Packed(p) => p.forward(xs),
            Self::Plain(l) => plain_forward(l, xs),
            Self::Adapted(l, adapter) => match adapter.forward_with_base(l, xs) {
                Some(ys) => ys,
                None => plain_forward(l, xs)? + adapter.forward(xs)?,
            },
        }
    }
}

/// candle's `Linear` forward; in training (f32 on the CPU) [`fused::linear`], and with
/// half-precision CPU weights widened block by block.
fn plain_forward(l: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    let w = l.weight();
    if let Some(b) = l.bias().filter(|b| fused::applies(&[xs, w, b])) {
        if needs_grad(&[xs, w, b]) {
            return fused::linear(xs, w, b);
        }
    }
    let half = matches!(w.dtype(), DType::BF16 | DType::F16);
    if !half || !w.device().is_cpu() || needs_grad(&[xs, w]) {
        return l.forward(xs);
    }
    // candle's CPU matmul has no bf16 kernel and widens both whole operands to f32 on every
    // call, and its f16 kernel is slower than f32: widen the weight a cache-sized block of
    // output rows at a time and multiply in f32, so half-precision weights cost half the
    // memory and no more time than f32.
    let (n, k) = w.dims2()?;
    let lead = &xs.dims()[..xs.rank().saturating_sub(1)];
    let x = xs.reshape(((), k))?.to_dtype(DType::F32)?.contiguous()?;
    // ~4 MiB of f32 weight per block: stays in L3 between widening and use.
    let rows = ((1 << 20) / k).clamp(16, n.max(16));
    let blocks = (0..n)
        .step_by(rows)
        .map(|start| {
            let block = w
                .narrow(0, start, rows.min(n - start))?
                .to_dtype(DType::F32)?;
            x.matmul(&block.t()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out_shape = lead.to_vec();
    out_shape.push(n);
    let ys = Tensor::cat(&blocks, 1)?
        .to_dtype(w.dtype())?
        .reshape(out_shape)?;
    match l.bias() {
        Some(b) => ys.broadcast_add(b),
        None => Ok(ys),
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
    qkv: Projections,
    out_proj: Linear,
    inner_attn_ln: Option<LayerNorm>,
    num_heads: usize,
    head_dim: usize,
    /// Dropout on the attention probabilities in train mode.
    dropout: (f64, Arc<TrainMode>),
}

#[derive(Debug, Clone)]
enum Projections {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// q, k and v stacked into one packed GEMM: self-attention reads one input for all three,
    /// so one call (one activation packing, one thread fork) instead of three.
    Fused(Arc<PackedLinear>),
}

impl Attention {
    /// `inner_ln_eps`: `Some(eps)` loads `inner_attn_ln` (text self-attention); `dropout`: the
    /// attention-probability dropout and the model's train mode.
    pub(crate) fn new(
        dim: usize,
        num_heads: usize,
        inner_ln_eps: Option<f64>,
        dropout: (f64, Arc<TrainMode>),
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner_attn_ln = match inner_ln_eps {
            Some(eps) => Some(LayerNorm::new(dim, eps, vb.pp("inner_attn_ln"))?),
            None => None,
        };
        Ok(Self {
            qkv: Projections::Separate {
                q: linear(dim, dim, vb.pp("q_proj"))?,
                k: linear(dim, dim, vb.pp("k_proj"))?,
                v: linear(dim, dim, vb.pp("v_proj"))?,
            },
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            inner_attn_ln,
            num_heads,
            head_dim: dim / num_heads,
            dropout,
        })
    }

    /// Packs the projections for CPU inference ([`Linear::pack`]); `self_attention` fuses q, k
    /// and v into one GEMM, after which only [`Self::forward_self`] works.
    pub(crate) fn pack(&mut self, format: WeightFormat, self_attention: bool) -> Result<()> {
        self.out_proj.pack(format)?;
        let Projections::Separate { q, k, v } = &mut self.qkv else {
            return Ok(());
        };
        if let (true, Linear::Plain(lq), Linear::Plain(lk), Linear::Plain(lv)) =
            (self_attention, &*q, &*k, &*v)
        {
            if packable(lq.weight(), format) {
                let weight = Tensor::cat(&[lq.weight(), lk.weight(), lv.weight()], 0)?;
                let bias = match (lq.bias(), lk.bias(), lv.bias()) {
                    (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
                    _ => None,
                };
                let fused = PackedLinear::new(&weight, bias.as_ref(), format)?;
                self.qkv = Projections::Fused(Arc::new(fused));
                return Ok(());
            }
        }
        for l in [q, k, v] {
            l.pack(format)?;
        }
        Ok(())
    }

    /// Adapters on q, k, v and out (`<prefix>.q_proj`, …); before packing only.
    pub(crate) fn adapt(&mut self, prefix: &str, make: &mut AdapterFactory) -> Result<()> {
        let Projections::Separate { q, k, v } = &mut self.qkv else {
            bail!("{prefix}: adapters go on unpacked projections");
        };
        for (name, l) in [("q_proj", q), ("k_proj", k), ("v_proj", v)] {
            l.adapt(&format!("{prefix}.{name}"), make)?;
        }
        self.out_proj.adapt(&format!("{prefix}.out_proj"), make)
    }

    /// `(B, T, D)` → `(B, H, T, hd)`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `queries (B, Tq, D)` attend to `key_values (B, Tk, D)`; `mask` is additive, `(Tq, Tk)` f32.
    pub(crate) fn forward(
        &self,
        queries: &Tensor,
        key_values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Projections::Separate { q, k, v } = &self.qkv else {
            bail!("cross-attention with fused q/k/v projections (packed as self-attention)");
        };
        self.attend(
            q.forward(queries)?,
            k.forward(key_values)?,
            v.forward(key_values)?,
            mask,
        )
    }

    /// Self-attention of `xs (B, T, D)` computing only rows `first..` of the output
    /// `(B, T - first, D)`; keys and values come from every row. `mask`: `(T - first, T)`.
    pub(crate) fn forward_self(
        &self,
        xs: &Tensor,
        first: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rows = xs.dim(1)? - first;
        match &self.qkv {
            Projections::Separate { q, k, v } => {
                let queries = xs.narrow(1, first, rows)?.contiguous()?;
                self.attend(q.forward(&queries)?, k.forward(xs)?, v.forward(xs)?, mask)
            }
            Projections::Fused(qkv) => {
                let all = qkv.forward(xs)?;
                let d = self.num_heads * self.head_dim;
                let part = |i: usize| all.narrow(2, i * d, d);
                self.attend(part(0)?.narrow(1, first, rows)?, part(1)?, part(2)?, mask)
            }
        }
    }

    /// Scaled dot-product attention of projected `q (B, Tq, D)` over `k`, `v (B, Tk, D)`, then
    /// `inner_attn_ln` and `out_proj`.
    fn attend(&self, q: Tensor, k: Tensor, v: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, tq, d) = q.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        if needs_grad(&[&q, &k, &v]) && fused::applies(&[&q, &k, &v]) {
            let dropout = self.dropout.1.dropout_mask(self.dropout.0);
            let out = fused::attention(&q, &k, &v, self.num_heads, scale as f32, mask, dropout)?;
            return self.project(out);
        }
        let q = self.split_heads(&(q * scale)?)?;
        let k = self.split_heads(&k)?;
        let v = self.split_heads(&v)?;
        // (B, H, Tq, Tk); softmax in f32 for half-precision weights.
        let scores = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = if needs_grad(&[&scores]) {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        }
        .to_dtype(v.dtype())?;
        let probs = self.dropout.1.dropout(&probs, self.dropout.0)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, tq, d))?;
        self.project(out)
    }

    /// `inner_attn_ln` (text) and `out_proj` of the heads' concatenation `(B, Tq, D)`.
    fn project(&self, out: Tensor) -> Result<Tensor> {
        let out = match &self.inner_attn_ln {
            Some(ln) => ln.forward(&out)?,
            None => out,
        };
        self.out_proj.forward(&out)
    }
}
