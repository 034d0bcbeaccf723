//! Train-mode state shared by every layer of a model: the dropout masks' stream and the gradient
//! checkpointing tape (each checkpointed layer's input, recomputed in [`TrainMode::backward`]).

use std::collections::HashSet;

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
        let Some(mask) = self.dropout_mask(p) else {
            return Ok(xs.clone());
        };
        if fused::applies(&[xs]) {
            return fused::dropout(xs, mask);
        }
        let factors = Tensor::from_vec(mask.factors(xs.elem_count()), xs.shape(), xs.device())?;
        xs.mul(&factors.to_dtype(xs.dtype())?)
    }

    /// The mask of the next dropout with probability `p`; none when off or `p == 0`. Each call
    /// draws a new one: a function of (seed, call number, element index) alone, so it is the same
    /// whatever the threads do.
    pub(crate) fn dropout_mask(&self, p: f64) -> Option<fused::Mask> {
        let seed = self.seed.load(Ordering::SeqCst);
        if seed == 0 || p <= 0.0 {
            return None;
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        Some(fused::Mask::new(seed, call, p))
    }
}
