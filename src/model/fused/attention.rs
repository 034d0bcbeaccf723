//! Multi-head scaled dot-product attention for training, as one op: `softmax(q·kᵀ·scale + mask)`,
//! dropout on the probabilities, times `v`, for every head. Written with candle ops it is about
//! fifteen graph nodes per layer (head splits, transposes, copies, the score-sized softmax and
//! dropout), each of which candle's backward gives a fresh zeroed gradient and an add. This op
//! keeps the probabilities and computes the heads' products in parallel, one head per thread.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{gemm_with, View};
use super::{f32_data3, with_f32, Mask};

/// Attention of `q (B, Tq, D)` over `k`, `v (B, Tk, D)` with `heads` heads → `(B, Tq, D)`.
/// `mask`: additive `(Tq, Tk)`; `dropout`: on the probabilities, in `(B, H, Tq, Tk)` order.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    mask: Option<&Tensor>,
    dropout: Option<Mask>,
) -> Result<Tensor> {
    let mask = mask
        .map(|m| {
            m.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()
        })
        .transpose()?;
    let op = AttentionOp {
        heads,
        scale,
        mask,
        dropout,
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct AttentionOp {
    heads: usize,
    scale: f32,
    mask: Option<Vec<f32>>,
    dropout: Option<Mask>,
    /// The forward's softmax output `(B, H, Tq, Tk)`, before dropout: what the backward needs.
    probs: Mutex<Option<Vec<f32>>>,
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    d: usize,
    hd: usize,
    heads: usize,
}

impl Dims {
    /// Head `h` of batch `b` of a `(B, T, D)` tensor: `T × hd`.
    fn head<'a>(&self, data: &'a [f32], t: usize, pair: usize) -> View<'a> {
        let (b, h) = (pair / self.heads, pair % self.heads);
        View::strided(&data[b * t * self.d + h * self.hd..], t, self.hd, self.d, 1)
    }

    /// Writes per-head blocks `(T × hd)` into a `(B, T, D)` tensor.
    fn merge(&self, blocks: &[Vec<f32>], t: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.b * t * self.d];
        for (pair, block) in blocks.iter().enumerate() {
            let (b, h) = (pair / self.heads, pair % self.heads);
            for (i, row) in block.chunks_exact(self.hd).enumerate() {
                let at = b * t * self.d + i * self.d + h * self.hd;
                out[at..at + self.hd].copy_from_slice(row);
            }
        }
        out
    }
}

impl AttentionOp {
    fn dims(&self, q: &Layout, k: &Layout) -> Result<Dims> {
        let (b, tq, d) = q.shape().dims3()?;
        let (bk, tk, dk) = k.shape().dims3()?;
        let heads = self.heads.max(1);
        let mask_ok = self.mask.as_ref().is_none_or(|m| m.len() == tq * tk);
        if bk != b || dk != d || d % heads != 0 || !mask_ok {
            bail!(
                "train-attention: q {:?}, k/v {:?}, {heads} heads",
                q.dims(),
                k.dims()
            );
        }
        Ok(Dims {
            b,
            tq,
            tk,
            d,
            hd: d / heads,
            heads,
        })
    }

    /// Probabilities after dropout (a copy of `p` when there is none).
    fn dropped(&self, p: &[f32], pair: usize) -> Vec<f32> {
        match &self.dropout {
            Some(mask) => mask.applied(pair * p.len(), p),
            None => p.to_vec(),
        }
    }
}

impl candle_core::CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "train-attention"
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
        let [q, k, v] = f32_data3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let dm = self.dims(l1, l2)?;
        if l3.dims() != l2.dims() {
            bail!("{}: k {:?} but v {:?}", self.name(), l2.dims(), l3.dims());
        }
        let mut probs = vec![0f32; dm.b * dm.heads * dm.tq * dm.tk];
        let blocks = probs
            .par_chunks_mut(dm.tq * dm.tk)
            .enumerate()
            .map(|(pair, p)| {
                gemm_with(
                    p,
                    dm.head(q, dm.tq, pair),
                    dm.head(k, dm.tk, pair).t(),
                    false,
                    1,
                )?;
                for (i, row) in p.chunks_exact_mut(dm.tk).enumerate() {
                    let mask = self.mask.as_ref().map(|m| &m[i * dm.tk..(i + 1) * dm.tk]);
                    softmax_row(row, self.scale, mask);
                }
                let mut out = vec![0f32; dm.tq * dm.hd];
                let p = self.dropped(p, pair);
                gemm_with(
                    &mut out,
                    View::new(&p, dm.tk, false),
                    dm.head(v, dm.tk, pair),
                    false,
                    1,
                )?;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
        Ok((
            CpuStorage::F32(dm.merge(&blocks, dm.tq)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dm = self.dims(q.layout(), k.layout())?;
        let guard = self.probs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(probs) = guard.as_ref() else {
            bail!("{}: backward before forward", self.name());
        };
        let (tq, tk, hd) = (dm.tq, dm.tk, dm.hd);
        let grads = with_f32(q, self.name(), |qd| {
            with_f32(k, self.name(), |kd| {
                with_f32(v, self.name(), |vd| {
                    with_f32(&g, self.name(), |gd| {
                        probs
                            .par_chunks(tq * tk)
                            .enumerate()
                            .map(|(pair, p)| {
                                let go = dm.head(gd, tq, pair);
                                // dV = P'ᵀ · dO
                                let dropped = self.dropped(p, pair);
                                let mut dv = vec![0f32; tk * hd];
                                gemm_with(&mut dv, View::new(&dropped, tk, true), go, false, 1)?;
                                // dP' = dO · Vᵀ, then through dropout and the softmax:
                                // dS = P ⊙ (dP − Σ dP ⊙ P) · scale
                                let mut ds = vec![0f32; tq * tk];
                                gemm_with(&mut ds, go, dm.head(vd, tk, pair).t(), false, 1)?;
                                if let Some(mask) = &self.dropout {
                                    mask.apply(pair * tq * tk, &mut ds);
                                }
                                for (row, prow) in ds.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
                                    let dot: f32 = row.iter().zip(prow).map(|(a, b)| a * b).sum();
                                    row.iter_mut()
                                        .zip(prow)
                                        .for_each(|(x, &p)| *x = p * (*x - dot) * self.scale);
                                }
                                let mut dq = vec![0f32; tq * hd];
                                gemm_with(
                                    &mut dq,
                                    View::new(&ds, tk, false),
                                    dm.head(kd, tk, pair),
                                    false,
                                    1,
                                )?;
                                let mut dk = vec![0f32; tk * hd];
                                gemm_with(
                                    &mut dk,
                                    View::new(&ds, tk, true),
                                    dm.head(qd, tq, pair),
                                    false,
                                    1,
                                )?;
                                Ok((dq, dk, dv))
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                })
            })
        })?;
        let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
        for (a, b, c) in grads {
            dq.push(a);
            dk.push(b);
            dv.push(c);
        }
        let wrap = |t: &Tensor, blocks: &[Vec<f32>], len: usize| {
            t.track_op()
                .then(|| Tensor::from_vec(dm.merge(blocks, len), t.shape(), &Device::Cpu))
                .transpose()
        };
        Ok((wrap(q, &dq, tq)?, wrap(k, &dk, tk)?, wrap(v, &dv, tk)?))
    }
}

/// `softmax(row · scale + mask)` in place.
fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    match mask {
        Some(m) => row
            .iter_mut()
            .zip(m)
            .for_each(|(x, &m)| *x = *x * scale + m),
        None => row.iter_mut().for_each(|x| *x *= scale),
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, value_and_grads};
    use super::*;
    use candle_core::{Var, D};

    /// Value and the gradients of q, k and v against candle ops, with a causal mask and dropout.
    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, tq, tk, heads, hd) = (2, 3, 5, 2, 4);
        let d = heads * hd;
        let var = |t: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, d), &dev)?);
        let (q, k, v) = (var(tq)?, var(tk)?, var(tk)?);
        let mask: Vec<f32> = (0..tq * tk)
            .map(|i| if i % tk > i / tk + 2 { f32::MIN } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), &dev)?;
        // Tq · Tk is odd: heads after the first start their mask at odd offsets.
        let drop = Mask::new(3, 0, 0.3);
        let probe = Tensor::randn(0f32, 1.0, (b, tq, d), &dev)?;
        let scale = 0.5f32;
        let plain = || -> Result<Tensor> {
            let split =
                |x: &Tensor, t: usize| x.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous();
            let s = (split(q.as_tensor(), tq)? * scale as f64)?
                .matmul(&split(k.as_tensor(), tk)?.t()?.contiguous()?)?
                .broadcast_add(&mask)?;
            let factors = drop.factors(b * heads * tq * tk);
            let p = candle_nn::ops::softmax(&s, D::Minus1)?.mul(&Tensor::from_vec(
                factors,
                (b, heads, tq, tk),
                &dev,
            )?)?;
            p.matmul(&split(v.as_tensor(), tk)?)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, tq, d))
        };
        let run = |y: Tensor| value_and_grads(y, &probe, &[&q, &k, &v]);
        let dropout = Some(drop);
        let ours = run(attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            heads,
            scale,
            Some(&mask),
            dropout,
        )?)?;
        let theirs = run(plain()?)?;
        assert_close(&ours, &theirs, 1e-5)?;
        Ok(())
    }
}
