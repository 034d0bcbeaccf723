//! Train-mode state shared by every layer of a model: the dropout masks' stream and the gradient
//! checkpointing tape (each checkpointed layer's input, recomputed in [`TrainMode::backward`]).

use std::collections::HashSet;

use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

use crate::model::fused;

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
                // Detached: candle leaves a weight's gradient attached to the ops that computed it
                // from the recomputed layer's activations, which would then live until the whole
                // backward returns (every layer's, so checkpointing would save next to nothing).
                let g = g.detach();
                let sum = match grads.get_id(id) {
                    Some(prev) => (prev + g)?,
                    None => g,
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
        let Some((keep, scale)) = self.dropout_mask(xs.elem_count(), p) else {
            return Ok(xs.clone());
        };
        if fused::applies(&[xs]) {
            return fused::dropout(xs, keep, scale);
        }
        let mask: Vec<f32> = keep.iter().map(|&k| if k { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }

    /// The kept elements of the next dropout of `n` elements with probability `p`, and the scale
    /// `1 / (1 − p)` of those kept; none when off or `p == 0`.
    pub(crate) fn dropout_mask(&self, n: usize, p: f64) -> Option<(Vec<bool>, f32)> {
        let seed = self.seed.load(Ordering::SeqCst);
        if seed == 0 || p <= 0.0 {
            return None;
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        // SplitMix64, two 32-bit draws per output: dropout draws an element-sized mask per layer
        // (the attention probabilities' alone are millions), and a cryptographic stream costs a
        // noticeable share of a training step. Output j is a function of (start, j) alone, so
        // chunks of the mask are drawn in parallel and the mask is the same whatever the threads.
        let start = seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let draw = |j: u64| {
            let mut z = start.wrapping_add((j + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        // Kept when the draw (uniform in [0, 2³²)) is at least p · 2³².
        let threshold = (p * 4_294_967_296.0).min(u64::MAX as f64) as u64;
        const CHUNK: usize = 1 << 14; // even: a chunk starts on a draw's first half
        let mut keep = vec![false; n];
        keep.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let first = (c * CHUNK / 2) as u64;
            for (j, pair) in out.chunks_mut(2).enumerate() {
                let z = draw(first + j as u64);
                pair[0] = z & 0xFFFF_FFFF >= threshold;
                if let Some(second) = pair.get_mut(1) {
                    *second = z >> 32 >= threshold;
                }
            }
        });
        Some((keep, (1.0 / (1.0 - p)) as f32))
    }
}
