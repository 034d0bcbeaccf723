//! Image preprocessing as RoboVLMs does it for Kosmos-2: torchvision `Resize((S, S), BICUBIC)` on a PIL
//! image (aspect ratio not kept) → `ToTensor` ([0, 1]) → `Normalize(CLIP mean, CLIP std)`.
//!
//! The resize reproduces Pillow's 8-bit bicubic resampler exactly (separable convolution with the
//! support widened by the downscale factor, Keys cubic a = −0.5, 22-bit fixed-point weights, horizontal
//! pass first with an 8-bit intermediate). `image`'s own `CatmullRom` filter is the same kernel in
//! floating point and differs from Pillow by ±1 grey level on some pixels, which moves the pixel values
//! by up to 1/255/0.26 ≈ 0.015; the exact port keeps the parity tests at zero difference.
//! Measured against Pillow 13.0: bit-exact for landscape and square frames shrunk or grown to the
//! square model input (e.g. 1280×720, 640×480 → 224; the fixtures). For some portrait inputs
//! (height shrinking more than the width, or width growing while height shrinks) Pillow 13 evidently
//! runs the vertical pass first, and results differ by up to a few grey levels there.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

/// CLIP normalisation, hard-coded in RoboVLMs (the HF processor config's values are not used).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Fixed-point precision of Pillow's 8-bit resampler (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output sample: first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // Pillow truncates `center ± support + 0.5` toward zero.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = w
                .iter()
                .map(|&v| {
                    let v = if sum != 0.0 { v / sum } else { v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            Taps { start: lo, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit for bit.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w_in, h_in) = (img.width() as usize, img.height() as usize);
    let (w_out, h_out) = (width as usize, height as usize);
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);

    // Horizontal pass: (h_in, w_out).
    let horizontal = if w_out != w_in {
        let tx = taps(w_in, w_out);
        let mut out = vec![0u8; h_in * w_out * 3];
        for y in 0..h_in {
            let row = &src[y * w_in * 3..(y + 1) * w_in * 3];
            for (x, t) in tx.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = half;
                    for (k, &w) in t.weights.iter().enumerate() {
                        acc += i64::from(row[(t.start + k) * 3 + c]) * i64::from(w);
                    }
                    out[(y * w_out + x) * 3 + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        src.clone()
    };

    // Vertical pass: (h_out, w_out).
    let pixels = if h_out != h_in {
        let ty = taps(h_in, h_out);
        let mut out = vec![0u8; h_out * w_out * 3];
        for (y, t) in ty.iter().enumerate() {
            for i in 0..w_out * 3 {
                let mut acc = half;
                for (k, &w) in t.weights.iter().enumerate() {
                    acc += i64::from(horizontal[(t.start + k) * w_out * 3 + i]) * i64::from(w);
                }
                out[y * w_out * 3 + i] = clip8(acc);
            }
        }
        out
    } else {
        horizontal
    };
    // The buffer length is h_out·w_out·3 by construction.
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| RgbImage::new(width, height))
}

/// The model input for one frame: `(1, 3, size, size)` f32, resized, scaled to [0, 1] and normalised.
pub fn pixel_values(img: &RgbImage, size: usize, device: &Device) -> Result<Tensor> {
    let s = size as u32;
    let resized = if img.dimensions() == (s, s) {
        img.clone()
    } else {
        resize_bicubic(img, s, s)
    };
    let plane = size * size;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            // Same operation order as torchvision (`x / 255`, then `(x - mean) / std`), all in f32.
            data[c * plane + i] = (f32::from(px[c]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Tensor::from_vec(data, (1, 3, size, size), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(1280, 224), (720, 224), (100, 224), (7, 3)] {
            for t in taps(i, o) {
                let s: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (s - (1i64 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        let out = resize_bicubic(&img, 16, 16);
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }
}
