//! Dropout masks as a function of the element index, and the dropout op. A mask is never stored:
//! element `i`'s keep flag is a hash of (seed, call, i), so the forward applies it while copying
//! and the backward draws the same flags again. A stored mask would cost a byte per element of
//! every dropped tensor (LoRA drops each adapted layer's input, attention its probabilities) and a
//! pass to write it.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_data, CHUNK};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One dropout's mask: element `i` is kept with probability `1 − p`, and kept elements are scaled
/// by `1 / (1 − p)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mask {
    start: u64,
    /// Kept when the element's 32-bit draw is at least this (`p · 2³²`).
    threshold: u64,
    scale: f32,
}

impl Mask {
    /// The mask of dropout call `call` under `seed`, with probability `p` (in (0, 1)).
    pub(crate) fn new(seed: u64, call: u64, p: f64) -> Self {
        Self {
            start: seed ^ call.wrapping_mul(GOLDEN),
            threshold: (p * 4_294_967_296.0).min(u64::MAX as f64) as u64,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// SplitMix64's output `j`: two 32-bit draws, for elements `2j` (low half) and `2j + 1`. A
    /// cryptographic stream would cost a noticeable share of a training step.
    #[inline(always)]
    fn draw(&self, j: u64) -> u64 {
        let mut z = self.start.wrapping_add((j + 1).wrapping_mul(GOLDEN));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[inline(always)]
    fn kept(&self, i: usize) -> bool {
        let z = self.draw((i / 2) as u64);
        (z >> (32 * (i % 2))) & 0xFFFF_FFFF >= self.threshold
    }

    /// `dst[j] = src[j] · scale` where element `offset + j` is kept, else 0; in parallel chunks.
    pub(crate) fn apply_into(&self, offset: usize, src: &[f32], dst: &mut [f32]) {
        let kernel = kernels().copy;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| kernel(self, offset + c * CHUNK, src, dst));
    }

    /// [`Mask::apply_into`] in place.
    pub(crate) fn apply(&self, offset: usize, xs: &mut [f32]) {
        let kernel = kernels().scale;
        xs.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, xs)| kernel(self, offset + c * CHUNK, xs));
    }

    /// A copy of `src` with the mask applied.
    pub(crate) fn applied(&self, offset: usize, src: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        self.apply_into(offset, src, &mut out);
        out
    }

    /// The mask's first `n` elements as factors (`scale` or 0): for tensors the ops here do not
    /// take.
    pub(crate) fn factors(&self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| if self.kept(i) { self.scale } else { 0.0 })
            .collect()
    }
}

/// The element loops, written per element (two draws' halves apart) so that they vectorise: with
/// AVX-512 (64-bit lane multiplies) the mask costs a fraction of a nanosecond per element, against
/// several scalar. Chosen once for this CPU.
struct Kernels {
    copy: fn(&Mask, usize, &[f32], &mut [f32]),
    scale: fn(&Mask, usize, &mut [f32]),
}

#[inline(always)]
fn copy_portable(mask: &Mask, offset: usize, src: &[f32], dst: &mut [f32]) {
    for (j, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
        *d = if mask.kept(offset + j) {
            s * mask.scale
        } else {
            0.0
        };
    }
}

#[inline(always)]
fn scale_portable(mask: &Mask, offset: usize, xs: &mut [f32]) {
    for (j, x) in xs.iter_mut().enumerate() {
        *x = if mask.kept(offset + j) {
            *x * mask.scale
        } else {
            0.0
        };
    }
}

fn kernels() -> &'static Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            return Kernels {
                copy: |m, o, s, d| unsafe { x86::copy_v4(m, o, s, d) },
                scale: |m, o, x| unsafe { x86::scale_v4(m, o, x) },
            };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return Kernels {
                copy: |m, o, s, d| unsafe { x86::copy_v3(m, o, s, d) },
                scale: |m, o, x| unsafe { x86::scale_v3(m, o, x) },
            };
        }
        Kernels {
            copy: copy_portable,
            scale: scale_portable,
        }
    })
}

/// The portable loops compiled for AVX-512 and AVX2. Safety: callers check the CPU has them.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{copy_portable, scale_portable, Mask};

    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2")]
    pub(super) unsafe fn copy_v4(mask: &Mask, offset: usize, src: &[f32], dst: &mut [f32]) {
        copy_portable(mask, offset, src, dst)
    }

    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2")]
    pub(super) unsafe fn scale_v4(mask: &Mask, offset: usize, xs: &mut [f32]) {
        scale_portable(mask, offset, xs)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn copy_v3(mask: &Mask, offset: usize, src: &[f32], dst: &mut [f32]) {
        copy_portable(mask, offset, src, dst)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scale_v3(mask: &Mask, offset: usize, xs: &mut [f32]) {
        scale_portable(mask, offset, xs)
    }
}

/// `nn.functional.dropout(xs)` with `mask`, from the first element.
pub(crate) fn dropout(xs: &Tensor, mask: Mask) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(DropoutOp(mask))
}

struct DropoutOp(Mask);

impl candle_core::CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "train-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.applied(0, x)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?.to_dtype(DType::F32)?.flatten_all()?;
        if g.elem_count() != res.elem_count() {
            bail!(
                "{}: a gradient of {:?} for {:?}",
                self.name(),
                g.dims(),
                res.dims()
            );
        }
        let mut dx = g.to_vec1::<f32>()?;
        self.0.apply(0, &mut dx);
        Ok(Some(Tensor::from_vec(dx, res.shape(), g.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Every kernel, at every offset, gives each element the flag of its own index, and about
    /// `1 − p` of them are kept.
    #[test]
    fn flags_depend_on_the_index_alone() {
        let mask = Mask::new(7, 3, 0.25);
        let n = 3 * CHUNK + 5;
        let factors = mask.factors(n);
        // The pairwise draw: element 2j is the low half of draw j, 2j + 1 its high half.
        for (i, f) in factors.iter().enumerate().step_by(97) {
            let z = mask.draw((i / 2) as u64);
            let half = if i % 2 == 0 { z & 0xFFFF_FFFF } else { z >> 32 };
            assert_eq!(*f != 0.0, half >= mask.threshold, "element {i}");
        }
        let ones = vec![1f32; n];
        for offset in [0, 1, 2, 7, CHUNK - 1] {
            let got = mask.applied(offset, &ones[..n - offset]);
            assert_eq!(got, factors[offset..], "offset {offset}");
            let mut portable = vec![0f32; n - offset];
            copy_portable(&mask, offset, &ones[..n - offset], &mut portable);
            assert_eq!(portable, got, "offset {offset}");
            let mut scaled = ones[..n - offset].to_vec();
            mask.apply(offset, &mut scaled);
            assert_eq!(scaled, got, "offset {offset}");
        }
        let kept = factors.iter().filter(|&&f| f != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(factors.iter().all(|&f| f == 0.0 || f == mask.scale));
        // Another call draws another mask.
        assert_ne!(Mask::new(7, 4, 0.25).factors(64), factors[..64]);
    }

    /// The op's value and gradient against a multiply by the mask's factors.
    #[test]
    fn op_matches_a_mask_multiply() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 7), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev)?;
        let mask = Mask::new(11, 0, 0.4);
        let factors = Tensor::from_vec(mask.factors(42), (2, 3, 7), &dev)?;
        let run = |y: Tensor| super::super::testing::value_and_grads(y, &probe, &[&x]);
        let ours = run(dropout(x.as_tensor(), mask)?)?;
        let theirs = run(x.mul(&factors)?)?;
        super::super::testing::assert_close(&ours, &theirs, 1e-6)
    }
}
