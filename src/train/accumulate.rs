//! Lightning's gradient accumulation: forward + backward of each batch with its loss divided by
//! `accumulate_grad_batches`, gradients summed, then one clipped AdamW step for the group.

use super::loss::{action_loss, Batch};
use super::optim::{clip_grad_norm, AdamW};
use super::TrainError;
use crate::model::Policy;
use crate::model::SinkScope;
use candle_core::{Tensor, Var};

/// One optimiser step's worth of batches: Lightning divides each batch's loss by
/// `accumulate_grad_batches` and sums the gradients; the step then clips and updates. The
/// backbone's training ops add their parameters' gradients in place ([`SinkScope`]); the rest
/// (head, action token, …) come from candle's backward and are summed here.
pub struct Accumulator {
    grads: Vec<Option<Tensor>>,
    sinks: SinkScope,
    losses: Vec<f64>,
    accumulate: usize,
}

impl Accumulator {
    pub fn new(params: &[Var], accumulate: usize) -> Self {
        Self {
            grads: vec![None; params.len()],
            sinks: SinkScope::open(params.iter().map(Var::as_tensor)),
            losses: Vec::new(),
            accumulate,
        }
    }

    /// Forward + backward of one batch; returns its (undivided) loss. A non-finite loss is an error
    /// naming `step` and the batch's episodes.
    pub fn add(
        &mut self,
        policy: &Policy,
        params: &[Var],
        batch: &Batch,
        gripper_ratio: f64,
        step: u64,
    ) -> Result<f64, TrainError> {
        let out = policy.forward_window(&batch.pixel_values, &batch.token_ids)?;
        let loss = action_loss(&out, batch, gripper_ratio)?;
        let value = loss.total.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step,
                episodes: batch.episodes.clone(),
            });
        }
        let grads = policy
            .backbone()
            .train_mode()
            .backward(&(loss.total / self.accumulate as f64)?, params)?;
        for (slot, var) in self.grads.iter_mut().zip(params) {
            if let Some(g) = grads.get(var.as_tensor()) {
                // candle leaves a parameter's gradient attached to the ops that computed it from
                // the activations (a weight's from its layer's input): detached, the whole
                // forward graph is freed when this batch's loss is dropped.
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        self.losses.push(value);
        Ok(value)
    }

    /// Clips (when `clip` is set) and steps; returns the group's mean loss and the gradient norm
    /// before clipping.
    pub fn apply(
        mut self,
        opt: &mut AdamW,
        params: &[Var],
        clip: Option<f64>,
        lr: f64,
    ) -> Result<(f64, Option<f64>), TrainError> {
        for (slot, var) in self.grads.iter_mut().zip(params) {
            if let Some(g) = self.sinks.take(var.as_tensor())? {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        let (norm, scale) = match clip {
            Some(max_norm) => {
                let (norm, scale) = clip_grad_norm(&self.grads, max_norm)?;
                (Some(norm), scale)
            }
            None => (None, 1.0),
        };
        opt.step(params, &self.grads, lr, scale)?;
        let loss = self.losses.iter().sum::<f64>() / self.losses.len().max(1) as f64;
        Ok((loss, norm))
    }
}
