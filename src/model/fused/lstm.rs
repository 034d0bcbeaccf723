//! The recurrent part of a PyTorch LSTM layer for training, from a zero state, as one op with
//! backpropagation through time of its own. Written with candle ops, every step's `h · W_hhᵀ`
//! backward computes a `(4H, H)` weight gradient and adds it to two zero tensors (16 MiB each for
//! RoboVLMs' 1024-wide head, per step and layer); here the steps' gate gradients are kept and
//! `dW_hh` is one product at the end.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Tensor};

use super::matmul::{gemm_into, View};
use super::{add_rows, f32_data3, gradient, with_f32};

/// `gates_x (B, T, 4H)` (the input projections, `x · W_ihᵀ + b_ih`), `w_hh (4H, H)`,
/// `b_hh (4H)`, gate order (i, f, g, o), zero initial state → every step's `[h | c]`, `(B, T, 2H)`.
pub(crate) fn lstm_from_zero(gates_x: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> Result<Tensor> {
    gates_x.contiguous()?.apply_op3(
        &w_hh.contiguous()?,
        &b_hh.contiguous()?,
        LstmOp {
            saved: Mutex::new(None),
        },
    )
}

struct LstmOp {
    /// Per step: the gates after their nonlinearities `(B, T, 4H)` and the cell `(B, T, H)`.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl candle_core::CustomOp3 for LstmOp {
    fn name(&self) -> &'static str {
        "train-lstm"
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
        let [gx, w, bias] = f32_data3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (b, t, h4) = l1.shape().dims3()?;
        let (w4, h) = l2.shape().dims2()?;
        if w4 != h4 || h4 != 4 * h || bias.len() != h4 {
            bail!(
                "{}: gates {:?}, w_hh {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let mut gates = vec![0f32; b * t * h4];
        let mut cells = vec![0f32; b * t * h];
        let mut out = vec![0f32; b * t * 2 * h];
        let (mut pre, mut prev_h) = (vec![0f32; b * h4], vec![0f32; b * h]);
        for step in 0..t {
            for bi in 0..b {
                let at = (bi * t + step) * h4;
                pre[bi * h4..(bi + 1) * h4]
                    .iter_mut()
                    .zip(&gx[at..at + h4])
                    .zip(bias)
                    .for_each(|((p, x), b)| *p = x + b);
            }
            if step > 0 {
                // pre += h_{t−1} · W_hhᵀ
                gemm_into(
                    &mut pre,
                    View::new(&prev_h, h, false),
                    View::new(w, h, true),
                    true,
                )?;
            }
            for bi in 0..b {
                let p = &pre[bi * h4..(bi + 1) * h4];
                let row = bi * t + step;
                let g_out = &mut gates[row * h4..(row + 1) * h4];
                for j in 0..h {
                    let (i, f, g, o) = (
                        sigmoid(p[j]),
                        sigmoid(p[h + j]),
                        p[2 * h + j].tanh(),
                        sigmoid(p[3 * h + j]),
                    );
                    let c_prev = if step > 0 {
                        cells[(row - 1) * h + j]
                    } else {
                        0.0
                    };
                    let c = f * c_prev + i * g;
                    cells[row * h + j] = c;
                    prev_h[bi * h + j] = o * c.tanh();
                    out[row * 2 * h + j] = prev_h[bi * h + j];
                    out[row * 2 * h + h + j] = c;
                    (g_out[j], g_out[h + j], g_out[2 * h + j], g_out[3 * h + j]) = (i, f, g, o);
                }
            }
        }
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((gates, cells));
        Ok((CpuStorage::F32(out), Shape::from((b, t, 2 * h))))
    }

    fn bwd(
        &self,
        gx: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h2) = res.dims3()?;
        let (h, h4) = (h2 / 2, 2 * h2);
        let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some((gates, cells)) = guard.as_ref() else {
            bail!("{}: backward before forward", self.name());
        };
        let grad = grad.contiguous()?;
        // d(pre-activation gates) of every step, (B, T, 4H): the gradient of gates_x and b_hh.
        let mut dpre = vec![0f32; b * t * h4];
        with_f32(&grad, self.name(), |dh_out| {
            with_f32(w, self.name(), |wd| {
                let (mut dh_next, mut dc_next) = (vec![0f32; b * h], vec![0f32; b * h]);
                let mut step_pre = vec![0f32; b * h4];
                for step in (0..t).rev() {
                    for bi in 0..b {
                        let row = bi * t + step;
                        let gt = &gates[row * h4..(row + 1) * h4];
                        let dp = &mut step_pre[bi * h4..(bi + 1) * h4];
                        for j in 0..h {
                            let (i, f, g, o) = (gt[j], gt[h + j], gt[2 * h + j], gt[3 * h + j]);
                            let c = cells[row * h + j];
                            let c_prev = if step > 0 {
                                cells[(row - 1) * h + j]
                            } else {
                                0.0
                            };
                            let tc = c.tanh();
                            let dh = dh_out[row * h2 + j] + dh_next[bi * h + j];
                            let dc = dh * o * (1.0 - tc * tc)
                                + dc_next[bi * h + j]
                                + dh_out[row * h2 + h + j];
                            dc_next[bi * h + j] = dc * f;
                            dp[j] = dc * g * i * (1.0 - i);
                            dp[h + j] = dc * c_prev * f * (1.0 - f);
                            dp[2 * h + j] = dc * i * (1.0 - g * g);
                            dp[3 * h + j] = dh * tc * o * (1.0 - o);
                        }
                        dpre[row * h4..(row + 1) * h4].copy_from_slice(dp);
                    }
                    if step > 0 {
                        // dh_{t−1} = dpre_t · W_hh
                        gemm_into(
                            &mut dh_next,
                            View::new(&step_pre, h4, false),
                            View::new(wd, h, false),
                            false,
                        )?;
                    }
                }
                Ok(())
            })
        })?;
        let dw = with_f32(res, self.name(), |out| {
            gradient(w, |buf| {
                // dW_hh = Σ_{t ≥ 1} dpre_tᵀ · h_{t−1}, per sample: its steps are consecutive rows.
                for bi in (0..b).filter(|_| t > 1) {
                    let dp = &dpre[(bi * t + 1) * h4..(bi * t + t) * h4];
                    let hs = View::strided(&out[bi * t * h2..], t - 1, h, h2, 1);
                    gemm_into(buf, View::new(dp, h4, true), hs, true)?;
                }
                Ok(())
            })
        })?;
        let db = gradient(bias, |buf| {
            add_rows(buf, &dpre);
            Ok(())
        })?;
        let dgx = gx
            .track_op()
            .then(|| Tensor::from_vec(dpre, (b, t, h4), &Device::Cpu))
            .transpose()?;
        Ok((dgx, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, value_and_grads};
    use super::*;
    use candle_core::{DType, Var, D};

    /// Every step's h and c, and the gradients of all three inputs, against the step-by-step
    /// candle ops of `head::LstmLayer`, with a loss on both h and c.
    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h) = (2, 4, 3);
        let gx = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 4 * h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (4 * h, h), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 4 * h, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (b, t, 2 * h), &dev)?;
        let plain = || -> Result<Tensor> {
            let mut hc = Tensor::zeros((b, h), DType::F32, &dev)?;
            let mut c = hc.clone();
            let mut outs = vec![];
            for step in 0..t {
                let pre = (gx.narrow(1, step, 1)?.squeeze(1)? + hc.matmul(&w.t()?)?)?
                    .broadcast_add(bias.as_tensor())?;
                let ch = pre.chunk(4, D::Minus1)?;
                let sig = candle_nn::ops::sigmoid;
                let (i, f, g, o) = (sig(&ch[0])?, sig(&ch[1])?, ch[2].tanh()?, sig(&ch[3])?);
                c = ((f * &c)? + (i * g)?)?;
                hc = (o * c.tanh()?)?;
                outs.push(Tensor::cat(&[&hc, &c], 1)?);
            }
            Tensor::stack(&outs, 1)
        };
        let run = |y: Tensor| value_and_grads(y, &probe, &[&gx, &w, &bias]);
        let ours = run(lstm_from_zero(
            gx.as_tensor(),
            w.as_tensor(),
            bias.as_tensor(),
        )?)?;
        let theirs = run(plain()?)?;
        assert_close(&ours, &theirs, 1e-5)?;
        Ok(())
    }
}
