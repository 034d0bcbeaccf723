//! Training ops with a backward of their own (f32 on the CPU), for the policy's training forward.
//! candle's autograd keeps every op's inputs until `backward` returns and gives every graph node's
//! gradient a fresh zero tensor and an add; written with its plain ops, a layer norm keeps eight
//! activation-sized intermediates, attention some fifteen nodes, and a `Linear` on a 3-D input
//! computes one weight gradient per batch element. Each op here keeps its output and what its
//! backward needs, computes only the gradients of tracked inputs, and adds parameter gradients in
//! place where a [`sink`] is open. Layer norm and activations are here; linear, attention,
//! embedding, the LSTM recurrence, LoRA and dropout have a file each; `matmul` is their GEMM.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use crate::model::gemm::Epilogue;

mod attention;
mod dropout;
mod embedding;
mod linear;
mod lora;
mod lstm;
mod matmul;
pub(crate) mod sink;

pub(crate) use attention::attention;
pub(crate) use dropout::{dropout, Mask};
pub(crate) use embedding::embedding;
pub(crate) use linear::{linear, linear_act};
pub(crate) use lora::{lora, lora_linear};
pub(crate) use lstm::lstm_from_zero;
use sink::gradient;

/// Element-wise work split into cache-sized chunks over the rayon threads.
const CHUNK: usize = 1 << 14;

/// Whether backprop could reach through an op on these tensors.
pub(crate) fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Whether the ops below take these tensors.
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((start, end))) => Ok(&d[start..end]),
        _ => bail!("{op}: needs a contiguous f32 tensor on the CPU"),
    }
}

/// `f` on a contiguous f32 CPU tensor's elements.
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(f32_data(s, layout, op)?),
        _ => bail!("{op}: needs a contiguous f32 tensor on the CPU"),
    }
}

/// The three inputs of a [`candle_core::CustomOp3`] as contiguous f32 slices.
fn f32_data3<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<[&'a [f32]; 3]> {
    Ok([
        f32_data(s1, l1, op)?,
        f32_data(s2, l2, op)?,
        f32_data(s3, l3, op)?,
    ])
}

/// `sums += Σ rows` over the rows of `data` (each `sums.len()` wide): a per-feature gradient.
fn add_rows(sums: &mut [f32], data: &[f32]) {
    for row in data.chunks_exact(sums.len().max(1)) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.dims().last().copied().filter(|&d| d > 0).ok_or_else(|| {
        candle_core::Error::Msg(format!("expected a non-empty last dimension: {l:?}"))
    })
}

/// `nn.LayerNorm` over the last dimension: `(x − mean) / √(var + eps) · weight + bias`.
pub(crate) fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

struct LayerNormOp {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "train-layer-norm"
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
        let d = last_dim(l1)?;
        if w.len() != d || b.len() != d {
            bail!(
                "{}: weight/bias of {} for rows of {d}",
                self.name(),
                w.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_chunk(d);
        out.par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d))
            .for_each(|(out, x)| {
                for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                    let mean = row.iter().sum::<f32>() / d as f32;
                    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                    let std = (var + self.eps).sqrt();
                    for i in 0..d {
                        o[i] = (row[i] - mean) / std * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        let d = w.elem_count();
        // One pass over the rows: dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)), ĝ = g · weight;
        // the per-feature sums Σ g · x̂ (weight) and Σ g (bias) on the way, per chunk of rows in
        // parallel and then added in chunk order (the same sums whatever the threads do).
        let rows = rows_per_chunk(d);
        let mut dx = x.track_op().then(|| vec![0f32; x.elem_count()]);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = with_f32(x, self.name(), |xd| {
            with_f32(&g, self.name(), |gd| {
                with_f32(w, self.name(), |wd| {
                    let chunk = |(xc, gc, dxc): (&[f32], &[f32], Option<&mut [f32]>)| {
                        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                        let mut xhat = vec![0f32; d];
                        let mut dxc = dxc;
                        for (r, (row, grow)) in
                            xc.chunks_exact(d).zip(gc.chunks_exact(d)).enumerate()
                        {
                            let mean = row.iter().sum::<f32>() / d as f32;
                            let var =
                                row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                            let rstd = 1.0 / (var + self.eps).sqrt();
                            let (mut m1, mut m2) = (0f32, 0f32);
                            for i in 0..d {
                                xhat[i] = (row[i] - mean) * rstd;
                                let gh = grow[i] * wd[i];
                                m1 += gh;
                                m2 += gh * xhat[i];
                                dw[i] += grow[i] * xhat[i];
                                db[i] += grow[i];
                            }
                            let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                            if let Some(dx) = dxc.as_deref_mut() {
                                let out = &mut dx[r * d..(r + 1) * d];
                                for i in 0..d {
                                    out[i] = rstd * (grow[i] * wd[i] - m1 - xhat[i] * m2);
                                }
                            }
                        }
                        (dw, db)
                    };
                    let (xs, gs) = (xd.par_chunks(rows * d), gd.par_chunks(rows * d));
                    Ok(match dx.as_mut() {
                        Some(dx) => xs
                            .zip(gs)
                            .zip(dx.par_chunks_mut(rows * d))
                            .map(|((x, g), dx)| chunk((x, g, Some(dx))))
                            .collect(),
                        None => xs.zip(gs).map(|(x, g)| chunk((x, g, None))).collect(),
                    })
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        // The chunks' sums, added in chunk order, then into the gradients.
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pw, pb) in &partials {
            add_rows(&mut dw, pw);
            add_rows(&mut db, pb);
        }
        let (dw, db) = (
            gradient(w, |buf| {
                add_rows(buf, &dw);
                Ok(())
            })?,
            gradient(b, |buf| {
                add_rows(buf, &db);
                Ok(())
            })?,
        );
        Ok((dx, dw, db))
    }
}

/// Rows of width `d` per parallel chunk: about [`CHUNK`] elements.
fn rows_per_chunk(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// `act(xs)` (GELU or CLIP's quick-GELU); the backward recomputes from the input.
pub(crate) fn activation(xs: &Tensor, act: Epilogue) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(ActivationOp(act))
}

struct ActivationOp(Epilogue);

impl candle_core::CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "train-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = f32_data(s, l, self.name())?.to_vec();
        self.0.apply(&mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let mut d = g.flatten_all()?.to_vec1::<f32>()?;
        with_f32(&x.contiguous()?, self.name(), |xd| {
            self.0.backward(xd, &mut d);
            Ok(())
        })?;
        Tensor::from_vec(d, g.shape(), g.device()).map(Some)
    }
}

/// The ops' tests: each against the candle ops it replaces.
#[cfg(test)]
mod testing {
    use candle_core::{Result, Tensor, Var};

    /// `y` and the gradients of `vars` of `Σ y ⊙ probe` (a loss that weighs every output).
    pub(super) fn value_and_grads(y: Tensor, probe: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
        let grads = (&y * probe)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in vars {
            out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    }

    /// Every pair within `tol` (largest absolute difference).
    pub(super) fn assert_close(ours: &[Tensor], theirs: &[Tensor], tol: f32) -> Result<()> {
        assert_eq!(ours.len(), theirs.len());
        for (a, e) in ours.iter().zip(theirs) {
            let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < tol, "{diff}: {a} vs {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Each op's value and gradients against the plain candle ops it replaces.
    fn check(
        fused: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        plain: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, (2, 3, 7), &dev).unwrap() * 2.0).unwrap())
                .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 7, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut out = vec![y];
            for v in [&x, &w, &b] {
                out.push(
                    grads
                        .get(v.as_tensor())
                        .map_or_else(|| v.zeros_like().unwrap(), Clone::clone),
                );
            }
            out
        };
        for (a, e) in run(&fused).iter().zip(run(&plain)) {
            let diff = (a - &e)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}: {a} vs {e}");
        }
    }

    #[test]
    fn layer_norm_matches_plain_ops() {
        check(
            |x, w, b| layer_norm(x, w, b, 1e-5),
            |x, w, b| {
                let mean = x.mean_keepdim(D::Minus1)?;
                let c = x.broadcast_sub(&mean)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(w)?
                    .broadcast_add(b)
            },
        );
    }

    #[test]
    fn activations_match_plain_ops() {
        check(
            |x, _, _| activation(x, Epilogue::QuickGelu),
            |x, _, _| x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        );
        check(
            |x, _, _| activation(x, Epilogue::GeluErf),
            |x, _, _| x.gelu_erf(),
        );
    }
}
