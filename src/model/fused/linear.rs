//! `nn.Linear` for training: `x · Wᵀ + b` over the rows of `x` flattened to 2-D, one GEMM, with a
//! backward of its own. candle's `Linear` multiplies a `(B, T, K)` input by the weight broadcast to
//! `(B, K, N)`: its backward then computes a weight-sized gradient per batch element, sums them,
//! and the bias gradient goes through a broadcast and a strided reduction: over half of a training
//! backward's time. Here the weight gradient is one `Gᵀ · X` and the bias gradient a column sum,
//! and only the gradients of tracked tensors are computed (a frozen weight's is not).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::gemm::Epilogue;

use super::matmul::{affine, gemm_into, View};
use super::{add_rows, f32_data3, gradient, with_f32, CHUNK};

/// `xs (…, K) · weight (N, K)ᵀ + bias (N)` → `(…, N)`.
pub(crate) fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_act(xs, weight, bias, None)
}

/// `act(xs · weightᵀ + bias)`: the activation fused in (one graph node, not two), its input kept
/// for the backward.
pub(crate) fn linear_act(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Option<Epilogue>,
) -> Result<Tensor> {
    let op = LinearOp {
        act,
        pre: Mutex::new(None),
    };
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

struct LinearOp {
    act: Option<Epilogue>,
    /// With an activation: the forward's pre-activation output.
    pre: Mutex<Option<Vec<f32>>>,
}

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "train-linear"
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
        let [x, w, b] = f32_data3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (n, k) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&k) || b.len() != n {
            bail!(
                "{}: input {:?}, weight {:?}, bias {:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = affine(x, w, b)?;
        if let Some(act) = self.act {
            *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(out.clone());
            out.par_chunks_mut(CHUNK).for_each(|c| act.apply(c));
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (n, k) = w.dims2()?;
        let through_act = match self.act {
            Some(act) => {
                let pre = self.pre.lock().unwrap_or_else(|e| e.into_inner());
                let Some(pre) = pre.as_ref() else {
                    bail!("{}: backward before forward", self.name());
                };
                let mut d = g.flatten_all()?.to_vec1::<f32>()?;
                d.par_chunks_mut(CHUNK)
                    .zip(pre.par_chunks(CHUNK))
                    .for_each(|(d, p)| act.backward(p, d));
                Some(Tensor::from_vec(d, g.shape(), &Device::Cpu)?)
            }
            None => None,
        };
        let g = through_act.unwrap_or(g);
        with_f32(&g, self.name(), |gd| {
            with_f32(x, self.name(), |xd| {
                let dx = if x.track_op() {
                    let mut dx = vec![0f32; xd.len()];
                    with_f32(w, self.name(), |wd| {
                        gemm_into(
                            &mut dx,
                            View::new(gd, n, false),
                            View::new(wd, k, false),
                            false,
                        )
                    })?;
                    Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?)
                } else {
                    None
                };
                // dW = Gᵀ · X, accumulated in place where a sink takes it.
                let dw = gradient(w, |buf| {
                    gemm_into(buf, View::new(gd, n, true), View::new(xd, k, false), true)
                })?;
                let db = gradient(b, |buf| {
                    add_rows(buf, gd);
                    Ok(())
                })?;
                Ok((dx, dw, db))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, value_and_grads};
    use super::*;
    use candle_core::Var;

    /// Value and every gradient against candle's own `Linear`, for a 3-D input.
    #[test]
    fn matches_candle_linear() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 7), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 3, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev)?;
        let plain = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let run = |y: Tensor| value_and_grads(y, &probe, &[&x, &w, &b]);
        let ours = run(linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?)?;
        let theirs = run(candle_core::Module::forward(&plain, x.as_tensor())?)?;
        assert_close(&ours, &theirs, 1e-5)?;
        // A frozen weight and bias get no gradient, and their products are not computed.
        let frozen = linear(
            x.as_tensor(),
            &w.as_tensor().detach(),
            &b.as_tensor().detach(),
        )?;
        let grads = (&frozen * &probe)?.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        Ok(())
    }
}
