//! Building blocks shared by the Kosmos-2 towers.
//!
//! candle-nn's fused `layer_norm`/`softmax_last_dim` kernels have no backward
//! pass, and the backbone is fine-tuned end to end: when an input is tracked
//! for gradients, f32 on the CPU runs [`fused`]'s training ops (which keep only
//! what their backward needs) and anything else plain differentiable candle
//! ops. When no input is tracked (inference, or frozen weights on detached
//! inputs) candle-nn's kernels run: one pass over the data instead of eight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Module, Result, Tensor, TensorId, Var, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::fused;
use crate::model::gemm::{self, Epilogue, PackedLinear, WeightFormat};

/// Train-mode state shared by every layer of a model: dropout, off (inference) unless
/// [`TrainMode::enable`] set a seed, and gradient checkpointing. Masks come from a stream seeded by
/// (seed, call number), so a training step is reproducible, a resumed run draws the same masks,
/// and a checkpointed layer's recomputation replays its masks.
#[derive(Debug, Default)]
pub struct TrainMode {
    /// 0 = off; otherwise the step's seed (never 0 while on).
    seed: AtomicU64,
    calls: AtomicU64,
    checkpointing: AtomicBool,
    /// The checkpointed layers of the current training forward, in order. Their layers hold this
    /// `TrainMode` too: `backward`, `enable` and `disable` empty it, which ends that cycle.
    tape: Mutex<Vec<Segment>>,
}

/// A layer's recomputation from its input.
type LayerFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// One checkpointed layer of a training forward: all that stays of it until the backward.
struct Segment {
    /// The layer's input as the forward saw it: the previous segment's output leaf, or a tensor
    /// whose graph reaches further up (embeddings, action token, …).
    input: Tensor,
    /// The layer's output, detached and made a leaf, so the forward keeps none of its internals.
    output: Var,
    /// The dropout stream's state when the layer ran.
    seed: u64,
    call: u64,
    layer: LayerFn,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Segment({:?} -> {:?})",
            self.input.shape(),
            self.output.shape()
        )
    }
}

impl TrainMode {
    /// Dropout on with masks drawn from `seed` (e.g. derived from the run seed and the step).
    pub fn enable(&self, seed: u64) {
        self.seed.store(seed.max(1), Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
        self.tape().clear();
    }

    /// Dropout off (inference, validation); nothing is checkpointed.
    pub fn disable(&self) {
        self.seed.store(0, Ordering::SeqCst);
        self.tape().clear();
    }

    /// Gradient checkpointing of every transformer layer (both towers) in train mode: the forward
    /// keeps only each layer's input and [`Self::backward`] recomputes the layer.
    pub fn set_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::SeqCst);
    }

    fn tape(&self) -> std::sync::MutexGuard<'_, Vec<Segment>> {
        // The tape is only pushed to and taken whole: a panic elsewhere cannot leave it torn.
        self.tape.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `layer(xs)`. Checkpointed (train mode with checkpointing on, and something to
    /// differentiate), the layer runs on a detached `xs` and its output comes back as a fresh
    /// leaf, so its activations are freed at once; the tape keeps `xs` and the layer for
    /// [`Self::backward`].
    pub(crate) fn checkpoint<F>(&self, xs: &Tensor, layer: F) -> Result<Tensor>
    where
        F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    {
        let seed = self.seed.load(Ordering::SeqCst);
        if seed == 0 || !self.checkpointing.load(Ordering::SeqCst) {
            return layer(xs);
        }
        let call = self.calls.load(Ordering::SeqCst);
        let out = layer(&xs.detach())?;
        if !xs.track_op() && !out.track_op() {
            return Ok(out); // frozen layer on a constant input: no backward reaches it
        }
        let output = Var::from_tensor(&out.detach())?;
        let leaf = output.as_tensor().clone();
        self.tape().push(Segment {
            input: xs.clone(),
            output,
            seed,
            call,
            layer: Box::new(layer),
        });
        Ok(leaf)
    }

    /// `loss.backward()`, then the checkpointed layers' backward, last first: each layer is
    /// recomputed from its saved input (dropout masks replayed) and backpropagated from its
    /// output's gradient, which adds its parameters' gradients and hands its input's gradient on
    /// (to the previous layer's output leaf, or further up the graph). Of each of these backwards
    /// only the gradients of `params` and of the leaves are kept: candle also leaves gradients for
    /// the constants an op met (dropout masks, the output's gradient itself), which would otherwise
    /// pile up until the step. Without checkpointed layers this is `loss.backward()`.
    pub fn backward(&self, loss: &Tensor, params: &[Var]) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let tape = std::mem::take(&mut *self.tape());
        if tape.is_empty() {
            return Ok(grads);
        }
        let wanted: HashSet<TensorId> = params
            .iter()
            .map(|v| v.id())
            .chain(tape.iter().map(|s| s.output.id()))
            .collect();
        let state = (
            self.seed.load(Ordering::SeqCst),
            self.calls.load(Ordering::SeqCst),
        );
        let result = tape.into_iter().rev().try_for_each(|seg| {
            let Some(grad_out) = grads.remove(seg.output.as_tensor()) else {
                return Ok(()); // the loss does not depend on this layer
            };
            self.seed.store(seg.seed, Ordering::SeqCst);
            self.calls.store(seg.call, Ordering::SeqCst);
            let out = (seg.layer)(&seg.input)?;
            // d/dθ Σ(out ⊙ g) = gᵀ ∂out/∂θ: the vector-Jacobian product backward needs.
            let sub = (out * grad_out)?.sum_all()?.backward()?;
            for &id in sub.get_ids().filter(|id| wanted.contains(id)) {
                let Some(g) = sub.get_id(id) else { continue };
                let sum = match grads.get_id(id) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                grads.insert_id(id, sum);
            }
            Ok(())
        });
        self.seed.store(state.0, Ordering::SeqCst);
        self.calls.store(state.1, Ordering::SeqCst);
        result.map(|()| grads)
    }

    /// `nn.functional.dropout(xs, p, training)`: zeroes elements with probability `p` and scales
    /// the rest by `1 / (1 − p)`; the identity when off or `p == 0`.
    pub(crate) fn dropout(&self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let seed = self.seed.load(Ordering::SeqCst);
        if seed == 0 || p <= 0.0 {
            return Ok(xs.clone());
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let scale = (1.0 / (1.0 - p)) as f32;
        let keep: Vec<bool> = (0..xs.elem_count())
            .map(|_| rng.random::<f64>() >= p)
            .collect();
        if fused::applies(&[xs]) {
            return fused::dropout(xs, keep, scale);
        }
        let mask: Vec<f32> = keep.iter().map(|&k| if k { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }
}

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

/// Whether backprop could reach through an op on these tensors.
pub(crate) fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
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
            _ => {
                let ys = self.forward(xs)?;
                if act == Activation::QuickGelu && needs_grad(&[&ys]) && fused::applies(&[&ys]) {
                    fused::quick_gelu(&ys)
                } else {
                    act.forward(&ys)
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
            Self::Adapted(l, adapter) => plain_forward(l, xs)? + adapter.forward(xs)?,
        }
    }
}

/// candle's `Linear` forward, minus the frozen weight's gradient, and with half-precision CPU
/// weights widened block by block.
fn plain_forward(l: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    let w = l.weight();
    if needs_grad(&[xs]) && !needs_grad(&[w]) && w.dtype() == DType::F32 && w.device().is_cpu() {
        // A frozen weight under a trainable input: candle's matmul backward would also compute
        // the weight's (unused) gradient, a full weight-sized matmul and allocation per call. A
        // frozen bias is added inside the op too: broadcast-added outside, backward would leave an
        // output-sized gradient for it until `backward` returns.
        let frozen_bias = l.bias().filter(|b| !needs_grad(&[b]));
        let ys = xs.contiguous()?.apply_op1(FrozenMatmul {
            weight: w.clone(),
            weight_t: w.t()?,
            bias: frozen_bias.cloned(),
        })?;
        return match l.bias() {
            Some(b) if frozen_bias.is_none() => ys.broadcast_add(b),
            _ => Ok(ys),
        };
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

/// `x · Wᵀ (+ b)` for a frozen `W` (and `b`): the backward returns only the input's gradient `g · W`.
struct FrozenMatmul {
    /// (out, in)
    weight: Tensor,
    /// (in, out), a view.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (Some((start, end)), candle_core::CpuStorage::F32(data)) =
            (layout.contiguous_offsets(), storage)
        else {
            bail!("frozen-matmul: needs a contiguous f32 input");
        };
        let xs = Tensor::from_slice(
            &data[start..end],
            layout.shape().clone(),
            &candle_core::Device::Cpu,
        )?;
        let ys = xs.broadcast_matmul(&self.weight_t)?;
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        let shape = ys.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(ys.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.weight)?))
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
        let probs = if needs_grad(&[&scores]) && fused::applies(&[&scores]) {
            fused::softmax_last_dim(&scores)?
        } else if needs_grad(&[&scores]) {
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
        let out = match &self.inner_attn_ln {
            Some(ln) => ln.forward(&out)?,
            None => out,
        };
        self.out_proj.forward(&out)
    }
}
