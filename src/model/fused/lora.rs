//! A LoRA adapter's update for training, `scale · dropout(x) · Aᵀ · Bᵀ`, as one op. Written with
//! candle's `Linear`s, the adapter's two matrices are multiplied per batch element (the backward
//! then sums per-element weight gradients) and dropout keeps an input-sized f32 mask; here each
//! product is one GEMM, the dropout mask is drawn again in the backward rather than stored, and the
//! gradients of `A` and `B` go to their sinks.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Tensor};

use super::matmul::{affine, gemm_into, View};
use super::{f32_data3, gradient, with_f32, Mask};

/// `scale · dropout(xs) · aᵀ · bᵀ` for `xs (…, in)`, `a (r, in)`, `b (out, r)` → `(…, out)`.
pub(crate) fn lora(
    xs: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    dropout: Option<Mask>,
) -> Result<Tensor> {
    let op = LoraOp {
        base: None,
        scale,
        dropout,
        rank_out: Mutex::new(None),
    };
    xs.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// `xs · weightᵀ + bias + scale · dropout(xs) · aᵀ · bᵀ`: the adapted layer as one op, for a frozen
/// `weight (out, in)` and `bias` (no gradient computed for them). One output instead of the base's,
/// the adapter's and their sum.
pub(crate) fn lora_linear(
    xs: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    dropout: Option<Mask>,
) -> Result<Tensor> {
    let op = LoraOp {
        base: Some((weight.contiguous()?, bias.contiguous()?)),
        scale,
        dropout,
        rank_out: Mutex::new(None),
    };
    xs.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraOp {
    /// The frozen base layer's weight `(out, in)` and bias, when fused in.
    base: Option<(Tensor, Tensor)>,
    scale: f32,
    dropout: Option<Mask>,
    /// The forward's `dropout(x) · aᵀ`, `(M, r)`.
    rank_out: Mutex<Option<Vec<f32>>>,
}

impl LoraOp {
    /// `dropout(x)`, or `x` itself.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.dropout {
            Some(mask) => std::borrow::Cow::Owned(mask.applied(0, x)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

impl candle_core::CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "train-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, a, b] = f32_data3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (r, k) = l2.shape().dims2()?;
        let (n, rb) = l3.shape().dims2()?;
        if l1.dims().last() != Some(&k) || rb != r {
            bail!(
                "{}: x {:?}, A {:?}, B {:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let m = x.len() / k.max(1);
        let xd = self.dropped(x);
        let mut u = vec![0f32; m * r];
        gemm_into(
            &mut u,
            View::new(&xd, k, false),
            View::new(a, k, true),
            false,
        )?;
        u.iter_mut().for_each(|v| *v *= self.scale);
        let mut out = match &self.base {
            Some((w, bias)) => {
                if w.dims() != [n, k] || bias.dims() != [n] {
                    bail!(
                        "{}: base {:?} and {:?} for A {:?}, B {:?}",
                        self.name(),
                        w.dims(),
                        bias.dims(),
                        l2.dims(),
                        l3.dims()
                    );
                }
                // x · Wᵀ + bias, then the adapter's product added on.
                with_f32(w, self.name(), |wd| {
                    with_f32(bias, self.name(), |bd| affine(x, wd, bd))
                })?
            }
            None => vec![0f32; m * n],
        };
        gemm_into(
            &mut out,
            View::new(&u, r, false),
            View::new(b, r, true),
            true,
        )?;
        *self.rank_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (r, k) = a.dims2()?;
        let n = b.dim(0)?;
        let saved = self.rank_out.lock().unwrap_or_else(|e| e.into_inner());
        let Some(u) = saved.as_ref() else {
            bail!("{}: backward before forward", self.name());
        };
        with_f32(&g, self.name(), |gd| {
            // dB = gᵀ · u (u already carries the scale)
            let db = gradient(b, |buf| {
                gemm_into(buf, View::new(gd, n, true), View::new(u, r, false), true)
            })?;
            // du = scale · g · B
            let mut du = vec![0f32; u.len()];
            with_f32(b, self.name(), |bd| {
                gemm_into(
                    &mut du,
                    View::new(gd, n, false),
                    View::new(bd, r, false),
                    false,
                )
            })?;
            du.iter_mut().for_each(|v| *v *= self.scale);
            let (da, dx) = with_f32(x, self.name(), |xd| {
                let xd = self.dropped(xd);
                // dA = duᵀ · dropout(x)
                let da = gradient(a, |buf| {
                    gemm_into(buf, View::new(&du, r, true), View::new(&xd, k, false), true)
                })?;
                let dx = if x.track_op() {
                    let mut dx = vec![0f32; xd.len()];
                    with_f32(a, self.name(), |ad| {
                        gemm_into(
                            &mut dx,
                            View::new(&du, r, false),
                            View::new(ad, k, false),
                            false,
                        )
                    })?;
                    if let Some(mask) = &self.dropout {
                        mask.apply(0, &mut dx);
                    }
                    if let Some((w, _)) = &self.base {
                        // + g · W
                        with_f32(w, self.name(), |wd| {
                            gemm_into(
                                &mut dx,
                                View::new(gd, n, false),
                                View::new(wd, k, false),
                                true,
                            )
                        })?;
                    }
                    Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?)
                } else {
                    None
                };
                Ok((da, dx))
            })?;
            Ok((dx, da, db))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, value_and_grads};
    use super::*;
    use candle_core::Var;

    /// Value and the gradients of x, A and B against candle ops, with dropout.
    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, r, n) = (5, 7, 3, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, m, k), &dev)?)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (r, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, r), &dev)?)?;
        let drop = Mask::new(5, 1, 0.2);
        let probe = Tensor::randn(0f32, 1.0, (1, m, n), &dev)?;
        let plain = || -> Result<Tensor> {
            let xd = x.mul(&Tensor::from_vec(drop.factors(m * k), (1, m, k), &dev)?)?;
            xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * 0.5
        };
        let run = |y: Tensor| value_and_grads(y, &probe, &[&x, &a, &b]);
        let ours = run(lora(
            x.as_tensor(),
            a.as_tensor(),
            b.as_tensor(),
            0.5,
            Some(drop),
        )?)?;
        let theirs = run(plain()?)?;
        assert_close(&ours, &theirs, 1e-5)?;
        // With the frozen base layer fused in.
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        let dropout = Some(drop);
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let ours = run(lora_linear(xt, (&w, &bias), at, bt, 0.5, dropout)?)?;
        let base = candle_nn::Linear::new(w, Some(bias));
        let theirs = run((candle_core::Module::forward(&base, xt)? + plain()?)?)?;
        assert_close(&ours, &theirs, 1e-4)?;
        Ok(())
    }
}
