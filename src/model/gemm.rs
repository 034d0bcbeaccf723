//! Inference GEMM for `Linear` layers on x86-64 CPUs with AVX2 + FMA. One cohesive piece (packing,
//! kernels and their dispatch share one panel layout), hence one file over the usual size.
//!
//! A policy step is ~350 GFLOP of `x · Wᵀ` with few rows (81 text tokens, 257 vision tokens) and
//! large constant weights. A general GEMM packs the weight on every call; here each weight is
//! repacked once, at load, into 16-column panels laid out exactly as the 6×16 micro-kernel reads
//! them, so a call only packs the small activation and streams the weight once. Two formats:
//! - [`WeightFormat::F32`]: exact f32 (FMA); ~1.6× candle's matmul on these shapes on Zen 3.
//! - [`WeightFormat::I16`]: weights and activations rounded to 12-bit integers with one scale per
//!   256-long `k` block of each weight column / activation row, multiplied exactly in integers
//!   (`vpmaddwd`, 16 products per instruction against FMA's 8) and scaled back per block: about
//!   twice the f32 throughput, half the weight memory, and a relative error per block below
//!   1/4094 of its largest value (finer than bf16's 1/256 mantissa step).
//!
//! Other CPUs (and half-precision or trainable weights) keep candle's matmul. Portable versions of
//! the kernels define what the x86 ones compute; tests run both.
//!
//! One cohesive unit (packing, the threaded driver and its kernels share the panel layout), hence
//! its length.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Micro-tile: 6 rows × 16 columns = 12 AVX accumulators.
const MR: usize = 6;
const NR: usize = 16;
/// `k` per pass: a 16 KiB f32 weight micro-panel stays in L1 while every row tile uses it; also
/// the quantisation block of [`WeightFormat::I16`].
const KC: usize = 256;
/// Integer range of [`WeightFormat::I16`] values: a block's 256 products of two such values sum
/// to at most 256 · 2047² ≈ 1.07e9, inside i32.
const QMAX: f32 = 2047.0;

/// How a packed layer stores its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// f32, exact.
    F32,
    /// 12-bit integers in i16 with f32 scales per 256-long `k` block (see the module docs).
    I16,
}

/// One `k` row of an f32 weight panel: 16 columns on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PanelRow([f32; NR]);

/// One `k` pair of an i16 weight panel: `[c][k, k + 1]` for columns 0–7, then 8–15, as
/// `vpmaddwd` multiplies adjacent pairs.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PairRow([i16; 2 * NR]);

enum Panels {
    F32(Vec<PanelRow>),
    /// `rows`: `ceil(K / 2)` pairs per panel; `scales`: per panel, per `k` block, per column.
    I16 {
        rows: Vec<PairRow>,
        scales: Vec<[f32; NR]>,
    },
}

/// Which micro-kernels a layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    /// AVX2 + FMA intrinsics (checked present at construction).
    #[cfg(target_arch = "x86_64")]
    X86,
    /// Plain Rust: the definition the x86 kernels must match.
    Portable,
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            return Self::X86;
        }
        Self::Portable
    }
}

/// `y = x · Wᵀ + b` with `W` (N, K) repacked into `ceil(N / 16)` column panels.
pub(crate) struct PackedLinear {
    n: usize,
    k: usize,
    panels: Panels,
    bias: Option<Vec<f32>>,
    kernels: Kernels,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedLinear({} → {}, {:?})",
            self.k,
            self.n,
            self.format()
        )
    }
}

/// Whether this CPU runs the packed kernels.
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

/// The scale mapping a block whose largest magnitude is `max` onto ±[`QMAX`].
fn block_scale(max: f32) -> f32 {
    if max > 0.0 {
        max / QMAX
    } else {
        1.0
    }
}

impl PackedLinear {
    /// Packs a CPU `weight` (N, K) and optional `bias` (N,); any float dtype (widened to f32).
    pub(crate) fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        format: WeightFormat,
    ) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let panel_count = n.div_ceil(NR);
        let panels = match format {
            WeightFormat::F32 => {
                let mut rows = vec![PanelRow([0.0; NR]); panel_count * k];
                for (j, panel) in rows.chunks_mut(k).enumerate() {
                    for c in 0..NR.min(n - j * NR) {
                        let src = &w[(j * NR + c) * k..][..k];
                        for (row, &v) in panel.iter_mut().zip(src) {
                            row.0[c] = v;
                        }
                    }
                }
                Panels::F32(rows)
            }
            WeightFormat::I16 => {
                let (pairs, blocks) = (k.div_ceil(2), k.div_ceil(KC));
                let mut rows = vec![PairRow([0; 2 * NR]); panel_count * pairs];
                let mut scales = vec![[0f32; NR]; panel_count * blocks];
                for j in 0..panel_count {
                    for c in 0..NR.min(n - j * NR) {
                        let src = &w[(j * NR + c) * k..][..k];
                        let lane = (c / 8) * NR + (c % 8) * 2;
                        let mut q = [0i16; KC];
                        for (b, block) in src.chunks(KC).enumerate() {
                            let q = &mut q[..block.len()];
                            scales[j * blocks + b][c] = quantize(block, q);
                            for (p, &v) in q.iter().enumerate() {
                                let kk = b * KC + p;
                                rows[j * pairs + kk / 2].0[lane + kk % 2] = v;
                            }
                        }
                    }
                }
                Panels::I16 { rows, scales }
            }
        };
        let bias = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            n,
            k,
            panels,
            bias,
            kernels: Kernels::detect(),
        })
    }

    /// The same layer running the portable kernels (which an AVX2 host never picks itself).
    #[cfg(test)]
    fn portable(mut self) -> Self {
        self.kernels = Kernels::Portable;
        self
    }

    pub(crate) fn format(&self) -> WeightFormat {
        match self.panels {
            Panels::F32(_) => WeightFormat::F32,
            Panels::I16 { .. } => WeightFormat::I16,
        }
    }

    /// `xs (…, K)` → `(…, N)` in `xs`' dtype; the product runs in f32 (or exact integers).
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_act(xs, None)
    }

    /// [`Self::forward`] followed by `act`, applied by the GEMM threads to their own columns.
    pub(crate) fn forward_act(&self, xs: &Tensor, act: Option<Epilogue>) -> Result<Tensor> {
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
            self.matmul(&cpu.as_slice::<f32>()?[start..end], m, &mut y, act);
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.n;
        }
        Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(xs.dtype())
    }

    /// `y (m, N) = act(x (m, K) · Wᵀ + b)`, row-major.
    ///
    /// # Panics
    /// If `x` is not `m · K` or `y` not `m · N` long: the kernels write through raw pointers, and
    /// these sizes are what keeps every write inside `y`.
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32], act: Option<Epilogue>) {
        assert_eq!(x.len(), m * self.k, "packed linear: input is not m × K");
        assert_eq!(y.len(), m * self.n, "packed linear: output is not m × N");
        if m == 0 || self.n == 0 {
            return;
        }
        let a = match self.panels {
            Panels::F32(_) => Rows::F32(pack_rows(x, m, self.k)),
            Panels::I16 { .. } => Rows::I16(quantize_rows(x, m, self.k)),
        };
        let panel_count = self.n.div_ceil(NR);
        let out = SharedOut(y.as_mut_ptr());
        // Panels are shared out by work stealing, not split evenly up front: when another thread
        // (a node's control loop, DDS, the camera driver) preempts one worker, the others take
        // its remaining panels instead of waiting for it. An even split made policy_node's step
        // ~20 % slower than `infer`'s with a 50 Hz control loop beside it on 2 cores.
        (0..panel_count).into_par_iter().for_each(|j| {
            // Panels outermost: each weight block is read from memory once and reused from L1 by
            // every row tile; the (smaller) packed activation is what gets re-read, from L2/L3.
            for k0 in (0..self.k).step_by(KC) {
                // SAFETY: `y` is m × N (asserted above) and outlives the parallel loop; each
                // panel `j` is visited once, and its columns are written by that visit only.
                unsafe { self.panel_block(&a, m, j, k0, &out) };
            }
            if let Some(act) = act {
                // While the panel is in cache, and on every thread.
                let (col0, cols) = (j * NR, NR.min(self.n - j * NR));
                for r in 0..m {
                    // SAFETY: as above; row `r`'s columns of panel `j`.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out.0.add(r * self.n + col0), cols)
                    };
                    act.apply(row);
                }
            }
        });
    }

    /// Row tiles of output panel `j` over the `k` block starting at `k0`.
    ///
    /// # Safety
    /// `out` points to an `(m, N)` buffer whose panel-`j` columns no other thread touches.
    unsafe fn panel_block(&self, a: &Rows, m: usize, j: usize, k0: usize, out: &SharedOut) {
        let (n, k) = (self.n, self.k);
        let kc = KC.min(k - k0);
        let col0 = j * NR;
        let cols = NR.min(n - col0);
        let mut bias = [0f32; NR];
        if let Some(src) = &self.bias {
            bias[..cols].copy_from_slice(&src[col0..col0 + cols]);
        }
        let tiles = m.div_ceil(MR);
        for i in 0..tiles {
            let rows = MR.min(m - i * MR);
            let dst = out.0.add(i * MR * n + col0);
            let run = |out: Tile| match (&self.panels, a) {
                (Panels::F32(w), Rows::F32(a)) => {
                    let b_block = &w[j * k + k0..][..kc];
                    // The next block of weight rows (this panel's next `k` block, or the next
                    // panel's first), prefetched a slice per row tile so it is in cache when its
                    // first tile starts.
                    let next = &w[(j * k + k0 + kc).min(w.len())..];
                    let next = &next[..KC.min(next.len())];
                    let prefetch = &next[i * next.len() / tiles..(i + 1) * next.len() / tiles];
                    let a_tile = &a[(k0 * tiles + i * kc) * MR..][..kc * MR];
                    micro_kernel(self.kernels, a_tile, b_block, prefetch, out);
                }
                (Panels::I16 { rows: w, scales }, Rows::I16(a)) => {
                    let (pairs, kcp, block) = (k.div_ceil(2), kc.div_ceil(2), k0 / KC);
                    let b_block = &w[j * pairs + k0 / 2..][..kcp];
                    let a_tile = &a.data[(k0 / 2 * tiles + i * kcp) * MR..][..kcp * MR];
                    let a_scale = &a.scales[(block * tiles + i) * MR..][..MR];
                    let b_scale = &scales[j * k.div_ceil(KC) + block];
                    micro_kernel_i16(self.kernels, a_tile, b_block, a_scale, b_scale, out);
                }
                _ => unreachable!("activations are packed for the weight's format"),
            };
            if cols == NR {
                let init = if k0 == 0 { Init::Set(&bias) } else { Init::Add };
                run(Tile {
                    c: dst,
                    ldc: n,
                    rows,
                    init,
                });
                continue;
            }
            // Ragged right edge: through a full tile on the stack.
            let mut tile = [[0f32; NR]; MR];
            for (r, t) in tile.iter_mut().enumerate().take(rows) {
                let src = dst.add(r * n);
                for (c, v) in t.iter_mut().enumerate().take(cols) {
                    *v = if k0 == 0 { bias[c] } else { *src.add(c) };
                }
            }
            run(Tile {
                c: tile.as_mut_ptr().cast(),
                ldc: NR,
                rows,
                init: Init::Add,
            });
            for (r, t) in tile.iter().enumerate().take(rows) {
                std::ptr::copy_nonoverlapping(t.as_ptr(), dst.add(r * n), cols);
            }
        }
    }
}

/// An element-wise activation fused into the GEMM (fc1 → activation in both towers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `x · Φ(x)`, exact (erf) GELU.
    GeluErf,
    /// `x · σ(1.702 x)`.
    QuickGelu,
}

impl Epilogue {
    pub(crate) fn apply(self, xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            // SAFETY: AVX2 and FMA are present.
            return unsafe { apply_avx2(self, xs) };
        }
        apply_portable(self, xs);
    }

    /// `grads *= act'(pre)`: the backward through the activation of `pre`.
    pub(crate) fn backward(self, pre: &[f32], grads: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            // SAFETY: AVX2 and FMA are present.
            return unsafe { backward_avx2(self, pre, grads) };
        }
        backward_portable(self, pre, grads);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(act: Epilogue, xs: &mut [f32]) {
    // The same code, compiled so the loops vectorise.
    apply_portable(act, xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(act: Epilogue, pre: &[f32], grads: &mut [f32]) {
    backward_portable(act, pre, grads);
}

#[inline(always)]
fn backward_portable(act: Epilogue, pre: &[f32], grads: &mut [f32]) {
    let it = grads.iter_mut().zip(pre);
    match act {
        // Φ(x) + x·φ(x)
        Epilogue::GeluErf => it.for_each(|(g, &x)| {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp(-0.5 * x * x) * 0.398_942_3;
            *g *= x.mul_add(pdf, cdf);
        }),
        // σ(ax) · (1 + a·x·(1 − σ(ax)))
        Epilogue::QuickGelu => it.for_each(|(g, &x)| {
            let s = 1.0 / (1.0 + exp(-1.702 * x));
            *g *= s * (1.702 * x).mul_add(1.0 - s, 1.0);
        }),
    }
}

#[inline(always)]
fn apply_portable(act: Epilogue, xs: &mut [f32]) {
    match act {
        Epilogue::GeluErf => xs
            .iter_mut()
            .for_each(|x| *x *= 0.5 * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2))),
        Epilogue::QuickGelu => xs.iter_mut().for_each(|x| *x /= 1.0 + exp(-1.702 * *x)),
    }
}

/// `eˣ` within 2 ulp (Cephes `expf`: `2ⁿ · e^r`, `|r| ≤ ln2 / 2`), branch-free so it vectorises;
/// saturates to 0 / `f32::MAX`-ish outside ±87.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let e_r = (p * r).mul_add(r, r) + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` within 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32
        .mul_add(t, -1.453_152_1)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// The output pointer, shared by threads that write disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: the pointer is only dereferenced in `PackedLinear::matmul`'s parallel loop, where each
// thread writes a disjoint set of columns of a buffer that outlives the loop; nothing reads what
// another thread writes.
unsafe impl Sync for SharedOut {}

/// What a tile's product is added to: the 16 bias values (first `k` block) or what `c` holds.
#[derive(Clone, Copy)]
enum Init<'a> {
    Set(&'a [f32; NR]),
    Add,
}

/// Where a kernel writes: the first `rows` (≤ 6) rows of a 6 × 16 tile at `c`, `ldc` apart.
#[derive(Clone, Copy)]
struct Tile<'a> {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    init: Init<'a>,
}

/// An activation packed for one call.
enum Rows {
    F32(Vec<f32>),
    I16(QuantRows),
}

/// Activation rows as 12-bit integers, laid out as [`pack_rows`] does with `k` pairs packed in
/// one i32 (`[k] | [k + 1] << 16`); `scales`: per `k` block, per row tile, per row.
struct QuantRows {
    data: Vec<i32>,
    scales: Vec<f32>,
}

/// Splits a block-major packed buffer into its `(k0, tile, chunk)` pieces: for each 256-wide `k`
/// block, `tiles` chunks of `width(kc) · 6` values.
fn tile_chunks<T>(
    buf: &mut [T],
    k: usize,
    tiles: usize,
    width: impl Fn(usize) -> usize,
) -> Vec<(usize, usize, &mut [T])> {
    let mut rest = buf;
    let mut chunks = Vec::with_capacity(k.div_ceil(KC) * tiles);
    for k0 in (0..k).step_by(KC) {
        let w = width(KC.min(k - k0)) * MR;
        for i in 0..tiles {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(w);
            chunks.push((k0, i, chunk));
            rest = tail;
        }
    }
    chunks
}

/// `x (m, K)` → for each 256-wide `k` block, row tiles of 6, each `kc × 6` k-major (zero-padded
/// rows): block `k0` starts at `k0 · tiles · 6`, and the kernels of one block read one sequential
/// stream.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let tiles = m.div_ceil(MR);
    let mut a = vec![0f32; tiles * k * MR];
    tile_chunks(&mut a, k, tiles, |kc| kc)
        .into_par_iter()
        .for_each(|(k0, i, tile)| {
            let kc = tile.len() / MR;
            for r in 0..MR.min(m - i * MR) {
                let src = &x[(i * MR + r) * k + k0..][..kc];
                for (p, &v) in src.iter().enumerate() {
                    tile[p * MR + r] = v;
                }
            }
        });
    a
}

/// [`pack_rows`] for [`WeightFormat::I16`]: each row's `k` block rounded to ±[`QMAX`] with its
/// own scale.
fn quantize_rows(x: &[f32], m: usize, k: usize) -> QuantRows {
    let tiles = m.div_ceil(MR);
    let mut data = vec![0i32; tiles * k.div_ceil(2) * MR];
    let mut scales = vec![0f32; k.div_ceil(KC) * tiles * MR];
    tile_chunks(&mut data, k, tiles, |kc| kc.div_ceil(2))
        .into_par_iter()
        .zip(scales.par_chunks_mut(MR))
        .for_each(|((k0, i, tile), tile_scales)| {
            let kc = KC.min(k - k0);
            let mut q = [0i16; KC];
            for (r, scale) in tile_scales.iter_mut().enumerate().take(MR.min(m - i * MR)) {
                let src = &x[(i * MR + r) * k + k0..][..kc];
                *scale = quantize(src, &mut q[..kc]);
                for (p, pair) in q[..kc].chunks(2).enumerate() {
                    let hi = pair.get(1).map_or(0, |&v| i32::from(v));
                    tile[p * MR + r] = i32::from(pair[0] as u16) | (hi << 16);
                }
            }
        });
    QuantRows { data, scales }
}

/// `q = round(x / scale)` with `scale` mapping `max |x|` onto [`QMAX`]; returns `scale`, which is
/// NaN when `x` holds a NaN (an infinity gives an infinite scale): integers cannot hold either, so
/// the scale carries them into every product of the block, as an f32 product would.
fn quantize(x: &[f32], q: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { quantize_avx2(x, q) };
    }
    quantize_portable(x, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], q: &mut [i16]) -> f32 {
    // The same code, compiled so the loops vectorise (`vmaxps`, `vroundps`, `vcvtps2dq`).
    quantize_portable(x, q)
}

#[inline(always)]
fn quantize_portable(x: &[f32], q: &mut [i16]) -> f32 {
    // `f32::max` skips NaN, so NaN is looked for separately (branch-free, so this vectorises).
    let nan = x.iter().fold(false, |seen, v| seen | v.is_nan());
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if nan { f32::NAN } else { block_scale(max) };
    let inv = 1.0 / scale;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even() as i16;
    }
    scale
}

/// `c (rows × 16, row stride ldc) = init + a_tile (kc × 6)ᵀ · b (kc × 16)` for the first `rows`
/// (≤ 6) rows of the tile, prefetching the first `kc` rows of `prefetch` on the way.
///
/// # Safety
/// `out.c` must address `out.rows` rows of 16 writable floats `out.ldc` apart.
unsafe fn micro_kernel(
    kernels: Kernels,
    a: &[f32],
    b: &[PanelRow],
    prefetch: &[PanelRow],
    out: Tile,
) {
    assert_eq!(a.len(), b.len() * MR);
    #[cfg(target_arch = "x86_64")]
    if kernels == Kernels::X86 {
        // SAFETY: `Kernels::X86` is only chosen where AVX2 and FMA are present.
        x86::micro_kernel(a, b, prefetch, out);
        return;
    }
    let _ = (kernels, prefetch);
    let mut acc = [[0f32; NR]; MR];
    for (ak, bk) in a.chunks_exact(MR).zip(b) {
        for (acc_r, &av) in acc.iter_mut().zip(ak) {
            for (t, &bv) in acc_r.iter_mut().zip(&bk.0) {
                *t += av * bv;
            }
        }
    }
    store(&acc, out);
}

/// `c = init + Σ_pairs (a · b) · a_scale[row] · b_scale[col]` over one quantisation block.
///
/// # Safety
/// As [`micro_kernel`].
unsafe fn micro_kernel_i16(
    kernels: Kernels,
    a: &[i32],
    b: &[PairRow],
    a_scale: &[f32],
    b_scale: &[f32; NR],
    out: Tile,
) {
    assert!(a.len() == b.len() * MR && a_scale.len() == MR);
    #[cfg(target_arch = "x86_64")]
    if kernels == Kernels::X86 {
        // SAFETY: as in `micro_kernel`.
        x86::micro_kernel_i16(a, b, a_scale, b_scale, out);
        return;
    }
    let _ = kernels;
    let mut acc = [[0f32; NR]; MR];
    for (r, acc_r) in acc.iter_mut().enumerate() {
        for (col, t) in acc_r.iter_mut().enumerate() {
            let lane = (col / 8) * NR + (col % 8) * 2;
            let dot: i64 = a
                .chunks_exact(MR)
                .zip(b)
                .map(|(ap, bp)| {
                    let (lo, hi) = (ap[r] as i16, (ap[r] >> 16) as i16);
                    i64::from(lo) * i64::from(bp.0[lane])
                        + i64::from(hi) * i64::from(bp.0[lane + 1])
                })
                .sum();
            *t = dot as f32 * a_scale[r] * b_scale[col];
        }
    }
    store(&acc, out);
}

/// The portable kernels' epilogue.
///
/// # Safety
/// As [`micro_kernel`].
unsafe fn store(acc: &[[f32; NR]; MR], out: Tile) {
    for (r, acc_r) in acc.iter().enumerate().take(out.rows) {
        for (col, v) in acc_r.iter().enumerate() {
            let dst = out.c.add(r * out.ldc + col);
            *dst = v + match out.init {
                Init::Set(bias) => bias[col],
                Init::Add => *dst,
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Init, PairRow, PanelRow, Tile, MR, NR};

    /// `c[r] = init[r] + acc[r]` for the first `rows` rows of the 6 × 16 tile.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(acc: &[[__m256; 2]; MR], out: Tile) {
        for (r, acc_r) in acc.iter().enumerate().take(out.rows) {
            let dst = out.c.add(r * out.ldc);
            let (i0, i1) = match out.init {
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

    /// # Safety
    /// AVX2 and FMA must be present; `c` as for [`super::micro_kernel`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel(a: &[f32], b: &[PanelRow], prefetch: &[PanelRow], out: Tile) {
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
        store(&acc, out);
    }

    /// # Safety
    /// As [`micro_kernel`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel_i16(
        a: &[i32],
        b: &[PairRow],
        a_scale: &[f32],
        b_scale: &[f32; NR],
        out: Tile,
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let mut ap = a.as_ptr();
        for row in b {
            let b0 = _mm256_load_si256(row.0.as_ptr().cast());
            let b1 = _mm256_load_si256(row.0.as_ptr().add(NR).cast());
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(*ap.add(r));
                acc_r[0] = _mm256_add_epi32(acc_r[0], _mm256_madd_epi16(av, b0));
                acc_r[1] = _mm256_add_epi32(acc_r[1], _mm256_madd_epi16(av, b1));
            }
            ap = ap.add(MR);
        }
        let s0 = _mm256_loadu_ps(b_scale.as_ptr());
        let s1 = _mm256_loadu_ps(b_scale.as_ptr().add(8));
        let mut scaled = [[_mm256_setzero_ps(); 2]; MR];
        for ((o, acc_r), &sa) in scaled.iter_mut().zip(&acc).zip(a_scale) {
            let sa = _mm256_set1_ps(sa);
            o[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc_r[0]), _mm256_mul_ps(s0, sa));
            o[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc_r[1]), _mm256_mul_ps(s1, sa));
        }
        store(&scaled, out);
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
        // Rows, columns and depth off the 6 × 16 × 256 blocking (odd `k` too), and exact multiples.
        for (m, n, k) in [
            (1, 1, 1),
            (5, 17, 3),
            (6, 16, 256),
            (13, 40, 301),
            (81, 48, 513),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let want = reference(
                &x.flatten_all()?.to_vec1()?,
                &w.flatten_all()?.to_vec1()?,
                &b.to_vec1()?,
                m,
                n,
                k,
            );
            // f32 is exact up to summation order; 12-bit blocks err by ~|x||w|/4094 per product.
            for (format, tol) in [(WeightFormat::F32, 1e-4), (WeightFormat::I16, 4e-3)] {
                for packed in each_kernel(PackedLinear::new(&w, Some(&b), format)?) {
                    let got = packed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0f32, f32::max);
                    let bound = tol * (k as f32).sqrt();
                    assert!(
                        err < bound,
                        "{format:?} {:?} {m}×{n}×{k}: max error {err} ≥ {bound}",
                        packed.kernels
                    );
                }
            }
        }
        Ok(())
    }

    /// The layer as this host runs it and, where that is x86, with the portable kernels too.
    fn each_kernel(packed: PackedLinear) -> Vec<PackedLinear> {
        if packed.kernels == Kernels::Portable {
            return vec![packed];
        }
        let portable = PackedLinear {
            panels: match &packed.panels {
                Panels::F32(rows) => Panels::F32(rows.clone()),
                Panels::I16 { rows, scales } => Panels::I16 {
                    rows: rows.clone(),
                    scales: scales.clone(),
                },
            },
            bias: packed.bias.clone(),
            ..packed
        }
        .portable();
        vec![packed, portable]
    }

    #[test]
    fn non_finite_inputs_and_weights_give_non_finite_outputs() -> Result<()> {
        // Integers cannot hold NaN or ∞: before the fix an i16 layer turned a NaN activation into
        // 0 and the policy's non-finite check never fired.
        let dev = Device::Cpu;
        let (m, n, k) = (7, 19, 300);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut xv = Tensor::randn(0f32, 1.0, (m, k), &dev)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // Row 2, in the second `k` block.
            xv[2 * k + 260] = bad;
            let x = Tensor::from_vec(xv, (m, k), &dev)?;
            let mut wv = w.flatten_all()?.to_vec1::<f32>()?;
            // Column 5, in the first `k` block.
            wv[5 * k + 3] = bad;
            let w_bad = Tensor::from_vec(wv, (n, k), &dev)?;
            for format in [WeightFormat::F32, WeightFormat::I16] {
                for packed in each_kernel(PackedLinear::new(&w, None, format)?) {
                    let y = packed.forward(&x)?.to_vec2::<f32>()?;
                    let what = format!("{format:?} {:?} input {bad}", packed.kernels);
                    assert!(y[2].iter().all(|v| !v.is_finite()), "{what}: {:?}", y[2]);
                    let finite_rows = y.iter().enumerate().filter(|(r, _)| *r != 2);
                    assert!(finite_rows.flat_map(|(_, row)| row).all(|v| v.is_finite()));
                }
                let x_ok = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                for packed in each_kernel(PackedLinear::new(&w_bad, None, format)?) {
                    let y = packed.forward(&x_ok)?.to_vec2::<f32>()?;
                    let what = format!("{format:?} {:?} weight {bad}", packed.kernels);
                    assert!(y.iter().all(|row| !row[5].is_finite()), "{what}");
                    assert!(y.iter().all(|row| row[4].is_finite()), "{what}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn integer_blocks_scale_independently() -> Result<()> {
        // `k` block 0 of every row is 1000× larger than blocks 1–2: with one scale per row the
        // small blocks would round to zero; with one per block they keep their precision.
        let dev = Device::Cpu;
        let (m, n) = (7, 20);
        let big = (Tensor::randn(0f32, 1.0, (m, KC), &dev)? * 1000.0)?;
        let small = Tensor::randn(0f32, 1.0, (m, 2 * KC), &dev)?;
        let x = Tensor::cat(&[&big, &small], 1)?;
        let w = Tensor::randn(0f32, 1.0, (n, 3 * KC), &dev)?;
        let w_big = w.narrow(1, 0, KC)?.contiguous()?;
        let w_small = w.narrow(1, KC, 2 * KC)?.contiguous()?;
        let packed = |w: &Tensor| PackedLinear::new(w, None, WeightFormat::I16);
        // Block 0's (identically quantised) share taken out again.
        let got = (packed(&w)?.forward(&x)? - packed(&w_big)?.forward(&big)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = reference(
            &small.flatten_all()?.to_vec1()?,
            &w_small.flatten_all()?.to_vec1()?,
            &[0.0; 20],
            m,
            n,
            2 * KC,
        );
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        // Rounding of the subtraction's large operands (~3e4) in f32 adds ~1e-2.
        assert!(err < 0.15, "small blocks lost precision: max error {err}");
        Ok(())
    }

    #[test]
    fn fast_exp_and_erf_match_f64() {
        // erf by its Maclaurin series in f64 (converges fine for |x| ≤ 4). A&S 7.1.26 is 1.5e-7
        // in exact arithmetic; f32 rounding adds a little.
        let erf64 = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for n in 1..120 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -4000..=4000 {
            let x = i as f32 * 1e-3;
            let e = f64::from(exp(x * 20.0));
            let want = f64::from(x * 20.0).exp();
            assert!(
                (e - want).abs() <= 3e-7 * want,
                "exp({}) = {e}, want {want}",
                x * 20.0
            );
            let got = f64::from(erf(x));
            let want = erf64(f64::from(x));
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn fused_activations_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (9, 40), &dev)? * 3.0)?;
        let w = Tensor::randn(0f32, 1.0, (33, 40), &dev)?;
        let packed = PackedLinear::new(&w, None, WeightFormat::F32)?;
        let y = packed.forward(&x)?;
        let quick = (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?;
        for (act, want) in [
            (Epilogue::GeluErf, y.gelu_erf()?),
            (Epilogue::QuickGelu, quick),
        ] {
            let got = packed.forward_act(&x, Some(act))?;
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "{act:?}: max error {err}");
        }
        Ok(())
    }

    #[test]
    fn keeps_leading_dims_and_dtype() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let y = PackedLinear::new(&w, None, WeightFormat::F32)?.forward(&x)?;
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
