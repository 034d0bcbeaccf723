//! AdamW with `torch.optim.AdamW` semantics (single-tensor path, as torch runs it on the CPU), the
//! learning-rate schedules of RoboVLMs' `configure_optimizers`, and `clip_grad_norm_`.

use crate::config::train::SchedulerKind;
use candle_core::{Result, Tensor, Var};

/// torch's defaults (RoboVLMs sets only `lr` and `weight_decay`).
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    pub weight_decay: f64,
    /// Optimiser steps taken (torch's `state["step"]`).
    pub step: u64,
    pub moments: Vec<Moments>,
}

impl AdamW {
    pub fn new(params: &[Var], weight_decay: f64) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                Ok(Moments {
                    exp_avg: p.zeros_like()?,
                    exp_avg_sq: p.zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            weight_decay,
            step: 0,
            moments,
        })
    }

    /// One step at learning rate `lr`; `grads[i]` belongs to `params[i]`, and a parameter without
    /// a gradient is skipped, as torch does (the step count is shared: every trainable parameter
    /// of the policy gets a gradient from every batch).
    /// torch: `p *= 1 − lr·wd; m = lerp(m, g, 1−β1); v = β2·v + (1−β2)·g²;
    /// p −= lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + eps)`.
    /// `grad_scale` multiplies every gradient as it is read (the clipping factor of
    /// [`clip_grad_norm`]; 1 when not clipping).
    pub fn step(
        &mut self,
        params: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2_sqrt = (1.0 - BETA2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for ((p, g), m) in params.iter().zip(grads).zip(&mut self.moments) {
            let Some(g) = g else { continue };
            // A weight's gradient is often a transposed view.
            let g = &g.contiguous()?;
            if in_place::applies(&[p.as_tensor(), g, &m.exp_avg, &m.exp_avg_sq]) {
                let decay = 1.0 - lr * self.weight_decay;
                in_place::adamw(p, g, m, (decay, step_size, bc2_sqrt), grad_scale)?;
                continue;
            }
            let g = &if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let mut value = p.as_tensor().clone();
            if self.weight_decay != 0.0 {
                value = (value * (1.0 - lr * self.weight_decay))?;
            }
            // lerp(m, g, w) = m + w·(g − m)
            m.exp_avg = (&m.exp_avg + ((g - &m.exp_avg)? * (1.0 - BETA1))?)?;
            m.exp_avg_sq = ((&m.exp_avg_sq * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let denom = ((m.exp_avg_sq.sqrt()? / bc2_sqrt)? + EPS)?;
            let update = (m.exp_avg.div(&denom)? * step_size)?;
            p.set(&(value - update)?)?;
        }
        Ok(())
    }
}

/// AdamW's update element by element in place, for f32 CPU tensors: tensor ops would allocate a
/// new parameter and moments and hold several temporaries of the largest parameter (the word
/// embeddings) at once, the peak of a fine-tuning step. Same operations in the same order as the
/// tensor path (candle divides by a scalar as a multiplication by its reciprocal).
mod in_place {
    use super::{Moments, BETA1, BETA2, EPS};
    use candle_core::{
        bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var,
    };
    use rayon::prelude::*;

    pub fn applies(ts: &[&Tensor]) -> bool {
        ts.iter()
            .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous())
    }

    fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
            _ => bail!("adamw: needs contiguous f32 tensors on the CPU"),
        }
    }

    fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
            _ => bail!("adamw: needs contiguous f32 tensors on the CPU"),
        }
    }

    /// Element-wise work split into cache-sized chunks over the rayon threads (each element's
    /// arithmetic is the same whichever thread does it).
    const CHUNK: usize = 1 << 14;

    /// `f(dst, src…)` for every element.
    struct Elementwise<F>(F);

    impl<F: Fn(&mut f32, f32) + Sync> InplaceOp2 for Elementwise<F> {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dst_l: &Layout,
            s: &CpuStorage,
            l: &Layout,
        ) -> Result<()> {
            let (dst, src) = (data_mut(dst, dst_l)?, data(s, l)?);
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(x, &g)| (self.0)(x, g)));
            Ok(())
        }
    }

    impl<F: Fn(&mut f32, f32, f32) + Sync> InplaceOp3 for Elementwise<F> {
        fn name(&self) -> &'static str {
            "adamw-param"
        }

        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dst_l: &Layout,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let (dst, s1, s2) = (data_mut(dst, dst_l)?, data(s1, l1)?, data(s2, l2)?);
            dst.par_chunks_mut(CHUNK)
                .zip(s1.par_chunks(CHUNK))
                .zip(s2.par_chunks(CHUNK))
                .for_each(|((d, m), v)| {
                    for ((x, &m), &v) in d.iter_mut().zip(m).zip(v) {
                        (self.0)(x, m, v);
                    }
                });
            Ok(())
        }
    }

    /// `Σ g²` of an f32 CPU tensor without a temporary: per-chunk sums in parallel, added in
    /// order (the same result whatever the threads do); none for other tensors.
    pub fn sum_of_squares(g: &Tensor) -> Result<Option<f64>> {
        if !applies(&[g]) {
            return Ok(None);
        }
        let (storage, layout) = g.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            return Ok(None);
        };
        let partial: Vec<f64> = data(s, layout)?
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect();
        Ok(Some(partial.iter().sum()))
    }

    /// `grad_scale`: the clipping factor, applied to each gradient element as it is read (the
    /// same f32 product as scaling the gradient first, without a scaled copy of it).
    pub fn adamw(
        p: &Var,
        g: &Tensor,
        m: &Moments,
        (decay, step_size, bc2_sqrt): (f64, f64, f64),
        grad_scale: f64,
    ) -> Result<()> {
        let (w1, b2, w2) = ((1.0 - BETA1) as f32, BETA2 as f32, (1.0 - BETA2) as f32);
        let c = grad_scale as f32;
        let scaled = move |g: f32| if c != 1.0 { g * c } else { g };
        m.exp_avg.inplace_op2(
            g,
            &Elementwise(|m: &mut f32, g: f32| *m += (scaled(g) - *m) * w1),
        )?;
        m.exp_avg_sq.inplace_op2(
            g,
            &Elementwise(|v: &mut f32, g: f32| {
                let g = scaled(g);
                *v = *v * b2 + g * g * w2
            }),
        )?;
        let (decay, step, inv_bc2, eps) = (
            decay as f32,
            step_size as f32,
            (1.0 / bc2_sqrt) as f32,
            EPS as f32,
        );
        p.as_tensor().inplace_op3(
            &m.exp_avg,
            &m.exp_avg_sq,
            &Elementwise(|p: &mut f32, m: f32, v: f32| {
                let value = if decay != 1.0 { *p * decay } else { *p };
                *p = value - m / (v.sqrt() * inv_bc2 + eps) * step;
            }),
        )
    }
}

/// `clip_grad_norm_(params, max_norm)`: the L2 norm of all gradients together, and the factor
/// torch scales every gradient by, `max_norm / (norm + 1e-6)` when the norm is above `max_norm`
/// (else 1). [`AdamW::step`] applies the factor as it reads each gradient: a scaled copy of every
/// gradient would be one more pass and a gradient-sized allocation per step.
pub fn clip_grad_norm(grads: &[Option<Tensor>], max_norm: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += match in_place::sum_of_squares(g)? {
            Some(s) => s,
            None => g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
        };
    }
    let norm = sq.sqrt();
    Ok((norm, (max_norm / (norm + 1e-6)).min(1.0)))
}

/// The per-step learning-rate factor of RoboVLMs' scheduler choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    /// `warmup_epochs · iter_per_epoch + warmup_steps` (may be fractional).
    pub warmup_iters: f64,
    /// `min(max_epochs · iter_per_epoch, max_steps)`.
    pub iters: f64,
    pub min_lr_scale: f64,
}

impl Schedule {
    /// As RoboVLMs computes it from Lightning's `estimated_stepping_batches`.
    pub fn new(
        kind: SchedulerKind,
        steps_per_epoch: usize,
        max_epochs: usize,
        max_steps: Option<usize>,
        warmup_epochs: f64,
        warmup_steps: f64,
        min_lr_scale: f64,
    ) -> Self {
        let full = (steps_per_epoch * max_epochs) as f64;
        let estimated = max_steps.map_or(full, |m| full.min(m as f64));
        let iter_per_epoch = estimated / max_epochs as f64;
        let max_iters = max_steps.map_or(1e10, |m| m as f64);
        Self {
            kind,
            warmup_iters: warmup_epochs * iter_per_epoch + warmup_steps,
            iters: (max_epochs as f64 * iter_per_epoch).min(max_iters),
            min_lr_scale,
        }
    }

    /// `LambdaLR` factor at optimiser step `k` (0-based: the first step uses `factor(0)`).
    pub fn factor(&self, k: u64) -> f64 {
        let (k, w) = (k as f64, self.warmup_iters);
        match self.kind {
            // transformers: step / max(1, warmup) during warmup.
            SchedulerKind::Constant | SchedulerKind::Cosine if k < w => k / w.max(1.0),
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Cosine => {
                let progress = (k - w) / (self.iters - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            // RoboVLMs' adjust_learning_rate divides by warmup_iters as is.
            SchedulerKind::HalfCosine if k < w => k / w,
            SchedulerKind::HalfCosine => {
                let m = self.min_lr_scale;
                let phase = std::f64::consts::PI * (k - w) / (self.iters - w);
                m + (1.0 - m) * 0.5 * (1.0 + phase.cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_robovlms_formulas() {
        let s = Schedule::new(SchedulerKind::HalfCosine, 10, 2, None, 0.5, 0.0, 0.01);
        assert_eq!((s.warmup_iters, s.iters), (5.0, 20.0));
        assert_eq!(s.factor(0), 0.0);
        assert!((s.factor(4) - 0.8).abs() < 1e-12);
        assert!((s.factor(5) - 1.0).abs() < 1e-12);
        assert!((s.factor(20) - 0.01).abs() < 1e-12);
        let c = Schedule {
            kind: SchedulerKind::Cosine,
            ..s
        };
        assert!(c.factor(20).abs() < 1e-12, "HF cosine ignores min_lr_scale");
        let k = Schedule {
            kind: SchedulerKind::Constant,
            warmup_iters: 0.0,
            ..s
        };
        assert_eq!(k.factor(0), 1.0);
        let capped = Schedule::new(SchedulerKind::Constant, 10, 2, Some(7), 0.0, 3.0, 0.01);
        assert_eq!((capped.warmup_iters, capped.iters), (3.0, 7.0));
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = candle_core::Device::Cpu;
        let g = vec![
            Some(Tensor::new(&[3f32, 0.0], &dev).unwrap()),
            None,
            Some(Tensor::new(&[4f32], &dev).unwrap()),
        ];
        let (n, coef) = clip_grad_norm(&g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((coef - 0.2).abs() < 1e-6);
        assert_eq!(clip_grad_norm(&g, 10.0).unwrap().1, 1.0);
        // AdamW with the factor steps as it would on the scaled gradients.
        let p = || Var::new(&[1f32, -2.0], &dev).unwrap();
        let (a, b) = ([p()], [p()]);
        let scaled = vec![Some((g[0].as_ref().unwrap() * coef).unwrap())];
        let mut opt_a = AdamW::new(&a, 0.1).unwrap();
        let mut opt_b = AdamW::new(&b, 0.1).unwrap();
        opt_a.step(&a, &g[..1], 1e-2, coef).unwrap();
        opt_b.step(&b, &scaled, 1e-2, 1.0).unwrap();
        assert_eq!(
            a[0].to_vec1::<f32>().unwrap(),
            b[0].to_vec1::<f32>().unwrap()
        );
    }
}
