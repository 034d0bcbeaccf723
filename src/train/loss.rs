//! Training batches and RoboVLMs' action loss (`BasePolicyHead.loss`,
//! `robovlms/model/policy_head/base_policy.py`): Huber (smooth L1, β = 1) on the normalised
//! continuous dims, averaged over the unmasked `(sample, frame, chunk step)` elements; heads with a
//! gripper add `arm_gripper_loss_ratio ×` BCE-with-logits on the gripper logit, averaged the same way.

use crate::data::dataset::Sample;
use crate::model::head::HeadOutput;
use crate::model::policy::Policy;
use candle_core::{DType, Result, Tensor, D};
use std::collections::HashMap;
use std::path::PathBuf;

/// A batch as the training forward takes it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, W, 3, S, S)
    pub pixel_values: Tensor,
    /// The prompt of each sample.
    pub token_ids: Vec<Vec<u32>>,
    /// (B, W, n, arm_dim) normalised targets in the checkpoint's layout (dims the robot does not
    /// drive are 0, as the Mobile VLA fork pads them).
    pub labels: Tensor,
    /// (B, W, n) gripper targets (0: mobile episodes have no gripper).
    pub gripper_labels: Tensor,
    /// (B, W, n) 1 where the target lies inside the episode and the frame is real.
    pub mask: Tensor,
    /// Episode files of the samples, for error messages.
    pub episodes: Vec<PathBuf>,
}

impl Batch {
    pub fn new(
        policy: &Policy,
        samples: &[Sample],
        prompts: &mut HashMap<String, Vec<u32>>,
    ) -> crate::model::error::Result<Self> {
        let cfg = policy.config();
        let (arm, n) = (cfg.action.arm_dim(), cfg.fwd_pred_next_n);
        let idx = cfg.action.robot_indices;
        let dev = policy.device();
        let (mut frames, mut token_ids, mut labels, mut mask) = (vec![], vec![], vec![], vec![]);
        for s in samples {
            let instruction = s.instruction.clone().unwrap_or_default();
            let ids = match prompts.get(&instruction) {
                Some(ids) => ids.clone(),
                None => {
                    let ids = policy.encode_instruction(&instruction)?;
                    prompts.insert(instruction, ids.clone());
                    ids
                }
            };
            token_ids.push(ids);
            let pv = s
                .frames
                .iter()
                .map(|f| policy.pixel_values(f))
                .collect::<crate::model::error::Result<Vec<_>>>()?;
            frames.push(Tensor::cat(&pv, 0)?);
            for (t, chunk) in s.action_chunks.iter().enumerate() {
                for (k, a) in chunk.iter().take(n).enumerate() {
                    let mut row = vec![0f32; arm];
                    for (d, &i) in idx.iter().enumerate() {
                        row[i] = cfg.action.norm.map_or(a[d], |r| r.normalize(a[d]));
                    }
                    labels.extend(row);
                    let inside = s.chunk_mask[t][k] && s.frame_mask[t];
                    mask.push(if inside { 1f32 } else { 0.0 });
                }
            }
        }
        let b = samples.len();
        let w = samples.first().map_or(0, |s| s.frames.len());
        Ok(Self {
            pixel_values: Tensor::stack(&frames, 0)?,
            token_ids,
            labels: Tensor::from_vec(labels, (b, w, n, arm), dev)?,
            gripper_labels: Tensor::zeros((b, w, n), DType::F32, dev)?,
            mask: Tensor::from_vec(mask, (b, w, n), dev)?,
            episodes: samples.iter().map(|s| s.path.clone()).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }
}

/// The loss terms of one batch.
#[derive(Debug, Clone)]
pub struct Loss {
    /// `arm + ratio × gripper`, a scalar that backpropagates.
    pub total: Tensor,
    pub arm: f32,
    pub gripper: Option<f32>,
}

/// `huber_loss(pred, target, delta=1)` elementwise: `0.5·d²` for `|d| < 1`, else `|d| − 0.5`.
fn huber(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let d = (pred - target)?.abs()?;
    let q = d.minimum(1.0)?;
    (q.sqr()? * 0.5)? + (d - q)?
}

/// `binary_cross_entropy_with_logits(x, y)` elementwise: `max(x, 0) − x·y + log(1 + e^{−|x|})`.
fn bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (x.relu()? - (x * y)?)? + softplus
}

/// RoboVLMs' loss of a forward's outputs against a batch.
pub fn action_loss(out: &HeadOutput, batch: &Batch, gripper_ratio: f64) -> Result<Loss> {
    let mask = &batch.mask;
    let count = mask.sum_all()?;
    let arm_dim = out.actions.dim(D::Minus1)?;
    let pose = huber(&out.actions.to_dtype(DType::F32)?, &batch.labels)?
        .broadcast_mul(&mask.unsqueeze(D::Minus1)?)?
        .sum_all()?
        .div(&(&count * arm_dim as f64)?)?;
    let arm = pose.to_scalar::<f32>()?;
    let Some(g) = &out.gripper else {
        return Ok(Loss {
            total: pose,
            arm,
            gripper: None,
        });
    };
    let grip = bce_with_logits(&g.to_dtype(DType::F32)?, &batch.gripper_labels)?
        .mul(mask)?
        .sum_all()?
        .div(&count)?;
    let gripper = grip.to_scalar::<f32>()?;
    Ok(Loss {
        total: (pose + (grip * gripper_ratio)?)?,
        arm,
        gripper: Some(gripper),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn huber_and_bce_match_torch_values() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[0.5f32, 3.0, -2.0], &dev).unwrap();
        let t = Tensor::new(&[0.0f32, 0.0, 0.0], &dev).unwrap();
        // torch.nn.functional.huber_loss(p, t, reduction="none") = [0.125, 2.5, 1.5]
        assert_eq!(
            huber(&p, &t).unwrap().to_vec1::<f32>().unwrap(),
            [0.125, 2.5, 1.5]
        );
        let y = Tensor::new(&[1f32, 0.0, 1.0], &dev).unwrap();
        // binary_cross_entropy_with_logits(p, y, reduction="none")
        let want = [0.474_077_1f32, 3.048_587_4, 2.126_928];
        for (g, w) in bce_with_logits(&p, &y)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(want)
        {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
