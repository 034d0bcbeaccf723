//! Inference GEMM for `Linear` layers on x86-64 CPUs with AVX2 + FMA.
//!
//! A policy step is ~350 GFLOP of `x · Wᵀ` with few rows (81 text tokens, 257 vision tokens) and
//! large constant weights. A general GEMM packs the weight on every call; here each weight is
//! repacked once, at load, into 16-column panels laid out exactly as the 6×16 micro-kernel reads
//! them (one 64-byte line per `k`), so a call only packs the small activation and streams the
//! weight once. On the 2-core Zen 3 this project targets that is ~1.6× candle's matmul on these
//! shapes. Other CPUs (and half-precision or trainable weights) keep candle's matmul.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Micro-tile: 6 rows × 16 columns = 12 AVX accumulators.
const MR: usize = 6;
const NR: usize = 16;
/// `k` per pass: a 16 KiB weight micro-panel stays in L1 while every row tile uses it.
const KC: usize = 256;

/// One `k` row of a weight panel: 16 columns on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PanelRow([f32; NR]);

/// `y = x · Wᵀ + b` with `W` (N, K) f32 repacked into `ceil(N / 16)` panels of `K` rows.
pub(crate) struct PackedLinear {
    n: usize,
    k: usize,
    panels: Vec<PanelRow>,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedLinear({} → {})", self.k, self.n)
    }
}

/// Whether this CPU runs the packed kernel.
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedLinear {
    /// Packs a CPU `weight` (N, K) and optional `bias` (N,); any float dtype (widened to f32).
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let panel_count = n.div_ceil(NR);
        let mut panels = vec![PanelRow([0.0; NR]); panel_count * k];
        for (j, panel) in panels.chunks_mut(k).enumerate() {
            for c in 0..NR.min(n - j * NR) {
                let src = &w[(j * NR + c) * k..][..k];
                for (row, &v) in panel.iter_mut().zip(src) {
                    row.0[c] = v;
                }
            }
        }
        let bias = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self { n, k, panels, bias })
    }

    /// `xs (…, K)` → `(…, N)` in `xs`' dtype; the product runs in f32.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!(
                "packed linear expects inputs (…, {}), got {:?}",
                self.k,
                dims
            );
        }
        let m = xs.elem_count() / k.max(1);
        let x = xs.to_dtype(DType::F32)?.contiguous()?;
        let mut y = vec![0f32; m * self.n];
        {
            let (storage, layout) = x.storage_and_layout();
            let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
            else {
                candle_core::bail!("packed linear runs on the CPU only");
            };
            self.matmul(&cpu.as_slice::<f32>()?[start..end], m, &mut y);
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.n;
        }
        Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(xs.dtype())
    }

    /// `y (m, N) = x (m, K) · Wᵀ + b`, row-major.
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        if m == 0 || self.n == 0 {
            return;
        }
        let (n, k) = (self.n, self.k);
        let a = pack_rows(x, m, k);
        let panel_count = n.div_ceil(NR);
        let threads = rayon::current_num_threads().clamp(1, panel_count);
        let per = panel_count.div_ceil(threads);
        let out = SharedOut(y.as_mut_ptr());
        (0..threads).into_par_iter().for_each(|t| {
            let panels = t * per..((t + 1) * per).min(panel_count);
            // Panels outermost: each 16 KiB weight block is read from memory once and reused from
            // L1 by every row tile; the (smaller) packed activation is what gets re-read, from L2/L3.
            for j in panels.clone() {
                for k0 in (0..k).step_by(KC) {
                    // SAFETY: thread `t` writes only the columns of its own panels; `y` outlives
                    // the parallel loop.
                    unsafe { self.panel_block(&a, m, j, k0, &out) };
                }
            }
        });
    }

    /// Row tiles of output panel `j` over the `k` block starting at `k0`.
    ///
    /// # Safety
    /// `out` points to an `(m, N)` buffer whose panel-`j` columns no other thread touches.
    unsafe fn panel_block(&self, a: &[f32], m: usize, j: usize, k0: usize, out: &SharedOut) {
        let (n, k) = (self.n, self.k);
        let kc = KC.min(k - k0);
        let b_block = &self.panels[j * k + k0..][..kc];
        let col0 = j * NR;
        let cols = NR.min(n - col0);
        let mut bias = [0f32; NR];
        if let Some(src) = &self.bias {
            bias[..cols].copy_from_slice(&src[col0..col0 + cols]);
        }
        // The next block of weight rows (this panel's next `k` block, or the next panel's first),
        // prefetched a slice per row tile so it is in cache when its first tile starts.
        let next = &self.panels[(j * k + k0 + kc).min(self.panels.len())..];
        let next = &next[..KC.min(next.len())];
        let tiles = m.div_ceil(MR);
        for i in 0..tiles {
            let rows = MR.min(m - i * MR);
            let a_tile = &a[(k0 * tiles + i * kc) * MR..][..kc * MR];
            let prefetch = &next[i * next.len() / tiles..(i + 1) * next.len() / tiles];
            let dst = out.0.add(i * MR * n + col0);
            if rows == MR && cols == NR {
                let init = if k0 == 0 { Init::Set(&bias) } else { Init::Add };
                micro_kernel(a_tile, b_block, prefetch, dst, n, init);
                continue;
            }
            // Ragged edge: through a full tile on the stack.
            let mut tile = [[0f32; NR]; MR];
            for (r, t) in tile.iter_mut().enumerate().take(rows) {
                let src = dst.add(r * n);
                for (c, v) in t.iter_mut().enumerate().take(cols) {
                    *v = if k0 == 0 { bias[c] } else { *src.add(c) };
                }
            }
            micro_kernel(
                a_tile,
                b_block,
                prefetch,
                tile.as_mut_ptr().cast(),
                NR,
                Init::Add,
            );
            for (r, t) in tile.iter().enumerate().take(rows) {
                std::ptr::copy_nonoverlapping(t.as_ptr(), dst.add(r * n), cols);
            }
        }
    }
}

/// The output pointer, shared by threads that write disjoint columns.
struct SharedOut(*mut f32);
unsafe impl Sync for SharedOut {}

/// What a tile's product is added to: the 16 bias values (first `k` block) or what `c` holds.
#[derive(Clone, Copy)]
enum Init<'a> {
    Set(&'a [f32; NR]),
    Add,
}

/// `x (m, K)` → for each 256-wide `k` block, row tiles of 6, each `kc × 6` k-major (zero-padded
/// rows): block `k0` starts at `k0 · tiles · 6`, and the kernels of one block read one sequential
/// stream.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let tiles = m.div_ceil(MR);
    let mut a = vec![0f32; tiles * k * MR];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let block = &mut a[k0 * tiles * MR..][..tiles * kc * MR];
        for (i, tile) in block.chunks_mut(kc * MR).enumerate() {
            for r in 0..MR.min(m - i * MR) {
                let src = &x[(i * MR + r) * k + k0..][..kc];
                for (p, &v) in src.iter().enumerate() {
                    tile[p * MR + r] = v;
                }
            }
        }
    }
    a
}

/// `c (6 × 16, row stride ldc) = init + a_tile (kc × 6)ᵀ · b (kc × 16)`, prefetching the first
/// `kc` rows of `prefetch` on the way.
///
/// # Safety
/// `c` must address 6 rows of 16 writable floats `ldc` apart.
unsafe fn micro_kernel(
    a: &[f32],
    b: &[PanelRow],
    prefetch: &[PanelRow],
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    assert_eq!(a.len(), b.len() * MR);
    #[cfg(target_arch = "x86_64")]
    if supported() {
        x86::micro_kernel(a, b, prefetch, c, ldc, init);
        return;
    }
    let _ = prefetch;
    let mut acc = [[0f32; NR]; MR];
    for (ak, bk) in a.chunks_exact(MR).zip(b) {
        for (acc_r, &av) in acc.iter_mut().zip(ak) {
            for (t, &bv) in acc_r.iter_mut().zip(&bk.0) {
                *t += av * bv;
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (col, v) in acc_r.iter().enumerate() {
            let dst = c.add(r * ldc + col);
            *dst = v + match init {
                Init::Set(bias) => bias[col],
                Init::Add => *dst,
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Init, PanelRow, MR};

    /// # Safety
    /// AVX2 and FMA must be present; `c` as for [`super::micro_kernel`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel(
        a: &[f32],
        b: &[PanelRow],
        prefetch: &[PanelRow],
        c: *mut f32,
        ldc: usize,
        init: Init,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut ap = a.as_ptr();
        for (p, row) in b.iter().enumerate() {
            if let Some(line) = prefetch.get(p) {
                _mm_prefetch::<_MM_HINT_T0>(line.0.as_ptr().cast());
            }
            let b0 = _mm256_load_ps(row.0.as_ptr());
            let b1 = _mm256_load_ps(row.0.as_ptr().add(8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(r));
                acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
            }
            ap = ap.add(MR);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = c.add(r * ldc);
            let (i0, i1) = match init {
                Init::Set(bias) => (
                    _mm256_loadu_ps(bias.as_ptr()),
                    _mm256_loadu_ps(bias.as_ptr().add(8)),
                ),
                Init::Add => (_mm256_loadu_ps(dst), _mm256_loadu_ps(dst.add(8))),
            };
            _mm256_storeu_ps(dst, _mm256_add_ps(i0, acc_r[0]));
            _mm256_storeu_ps(dst.add(8), _mm256_add_ps(i1, acc_r[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| f64::from(x[i * k + p]) * f64::from(w[j * k + p]))
                    .sum();
                y[i * n + j] = dot as f32 + b[j];
            }
        }
        y
    }

    #[test]
    fn matches_a_naive_product_on_ragged_shapes() -> Result<()> {
        let dev = Device::Cpu;
        // Rows, columns and depth off the 6 × 16 × 256 blocking, and exact multiples.
        for (m, n, k) in [
            (1, 1, 1),
            (5, 17, 3),
            (6, 16, 256),
            (13, 40, 300),
            (81, 48, 513),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let packed = PackedLinear::new(&w, Some(&b))?;
            let got = packed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let want = reference(
                &x.flatten_all()?.to_vec1()?,
                &w.flatten_all()?.to_vec1()?,
                &b.to_vec1()?,
                m,
                n,
                k,
            );
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-4 * (k as f32).sqrt(),
                "{m}×{n}×{k}: max error {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn keeps_leading_dims_and_dtype() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let y = PackedLinear::new(&w, None)?.forward(&x)?;
        assert_eq!(y.dims(), &[2, 3, 5]);
        assert_eq!(y.dtype(), DType::BF16);
        let want = x.to_dtype(DType::F32)?.broadcast_matmul(&w.t()?)?;
        let err = (y.to_dtype(DType::F32)? - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 0.1, "bf16 round-trip error {err}");
        Ok(())
    }
}
