//! The training ops' matrix products: candle's GEMM on strided views, accumulating or not.

use candle_core::{bail, Result};
use rayon::prelude::*;

/// A row-major matrix view: `rows × cols` read at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `data` as `(len / cols, cols)`, transposed when `t`.
    pub(super) fn new(data: &'a [f32], cols: usize, t: bool) -> Self {
        let rows = data.len() / cols.max(1);
        if t {
            Self {
                data,
                rows: cols,
                cols: rows,
                rs: 1,
                cs: cols,
            }
        } else {
            Self {
                data,
                rows,
                cols,
                rs: cols,
                cs: 1,
            }
        }
    }

    /// `rows × cols` at `data[r·rs + c·cs]`.
    pub(super) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    pub(super) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst (m × n, contiguous) = [dst +] a · b` on candle's thread count.
pub(super) fn gemm_into(dst: &mut [f32], a: View, b: View, accumulate: bool) -> Result<()> {
    gemm_with(dst, a, b, accumulate, candle_core::utils::get_num_threads())
}

/// [`gemm_into`] on `threads` threads (1: the calling thread only). Products of at least 64 rows
/// per thread are split by rows, each part one single-threaded GEMM: gemm's own threading scaled
/// poorly on the policy's shapes (a training step took 3–6 % longer with it).
pub(super) fn gemm_with(
    dst: &mut [f32],
    a: View,
    b: View,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let (m, n) = (a.rows, b.cols);
    if threads <= 1 || m < 64 * threads || n == 0 || a.cols == 0 || dst.len() != m * n {
        return gemm_on(dst, a, b, accumulate, threads);
    }
    let rows = m.div_ceil(threads);
    dst.par_chunks_mut(rows * n)
        .enumerate()
        .try_for_each(|(i, part)| {
            let a = View {
                data: &a.data[i * rows * a.rs..],
                rows: part.len() / n,
                ..a
            };
            gemm_on(part, a, b, accumulate, 1)
        })
}

/// One GEMM call on `threads` threads.
fn gemm_on(dst: &mut [f32], a: View, b: View, accumulate: bool, threads: usize) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let in_bounds = |v: &View| {
        v.rows == 0 || v.cols == 0 || (v.rows - 1) * v.rs + (v.cols - 1) * v.cs < v.data.len()
    };
    if b.rows != k || dst.len() != m * n || !in_bounds(&a) || !in_bounds(&b) {
        bail!(
            "a ({m} × {k}) · ({} × {n}) product into {} elements",
            b.rows,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the GEMM reads, `r·rs + c·cs` for r < rows and c < cols, lies in its
    // slice (checked above), and `dst` is a distinct, exclusively borrowed m × n row-major block.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `x (M × K) · wᵀ + b` for `w (N × K)`, `b (N)`, row-major: the bias first, then the product
/// added onto it (one pass over the output fewer).
pub(super) fn affine(x: &[f32], w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let k = w.len() / n.max(1);
    let m = x.len() / k.max(1);
    // Row copies, in parallel: collecting a cycling iterator took a quarter of the product's time.
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n.max(1) * super::rows_per_chunk(n))
        .for_each(|rows| rows.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b)));
    gemm_into(
        &mut out,
        View::new(x, k, false),
        View::new(w, k, true),
        true,
    )?;
    Ok(out)
}
