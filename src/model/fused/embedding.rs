//! `nn.Embedding` for training. candle's `index_select` backward builds a zero tensor of the whole
//! table, adds the rows into it, and adds that to another zero tensor: for Kosmos-2's 65 k × 2048
//! table, three table-sized passes per batch for the few rows a prompt uses. Here the used rows
//! are added into the gradient ([`super::sink`]), and nothing else is touched.

use candle_core::{bail, CpuStorage, Layout, Result, Shape, Tensor};

use super::{f32_data, gradient, with_f32};

/// Rows `ids` of `table (V, D)`, shaped `ids_shape + (D)`.
pub(crate) fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let ids_shape = ids.dims().to_vec();
    let ids: Vec<usize> = ids
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let d = table.dim(1)?;
    let rows = table.contiguous()?.apply_op1(EmbeddingOp { ids })?;
    let mut shape = ids_shape;
    shape.push(d);
    rows.reshape(shape)
}

struct EmbeddingOp {
    ids: Vec<usize>,
}

impl candle_core::CustomOp1 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "train-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let table = f32_data(s, l, self.name())?;
        let (v, d) = l.shape().dims2()?;
        let mut out = Vec::with_capacity(self.ids.len() * d);
        for &id in &self.ids {
            if id >= v {
                bail!("{}: token id {id} outside a table of {v}", self.name());
            }
            out.extend_from_slice(&table[id * d..(id + 1) * d]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), d))))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = table.dim(1)?;
        let g = g.contiguous()?;
        with_f32(&g, self.name(), |gd| {
            gradient(table, |buf| {
                for (&id, row) in self.ids.iter().zip(gd.chunks_exact(d)) {
                    buf[id * d..(id + 1) * d]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(s, v)| *s += v);
                }
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, value_and_grads};
    use super::*;
    use candle_core::{Device, Var};

    /// Rows and the table's gradient (a repeated id adds twice) against candle's `Embedding`.
    #[test]
    fn matches_candle_embedding() -> Result<()> {
        let dev = Device::Cpu;
        let table = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 4), &dev)?)?;
        let ids = Tensor::new(&[[1u32, 4, 1]], &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (1, 3, 4), &dev)?;
        let plain = candle_nn::Embedding::new(table.as_tensor().clone(), 4);
        let run = |y: Tensor| value_and_grads(y, &probe, &[&table]);
        let ours = run(embedding(table.as_tensor(), &ids)?)?;
        let theirs = run(candle_core::Module::forward(&plain, &ids)?)?;
        assert_close(&ours, &theirs, 1e-6)?;
        Ok(())
    }
}
