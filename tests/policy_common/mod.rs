//! Shared helpers for the policy tests (policy_parity, ckpt_import, model_dir_errors, cli_infer): fixture paths, reference tensors, error measures.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The instruction the fixtures were generated with (leading/trailing spaces on purpose).
pub const INSTRUCTION: &str = "  Navigate around the obstacle on the left side and reach the cup ";
pub const FRAMES: usize = 6;

pub fn policy_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/policy")
}

pub fn expected(name: &str) -> HashMap<String, Tensor> {
    let path = policy_fixtures().join(format!("{name}_expected.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn frame_path(i: usize) -> PathBuf {
    policy_fixtures().join(format!("frames/f{i}.png"))
}

pub fn frame(i: usize) -> image::RgbImage {
    image::open(frame_path(i)).expect("fixture frame").to_rgb8()
}

/// A fixture's `input_ids` (i64) as token ids.
pub fn input_ids(exp: &HashMap<String, Tensor>) -> Vec<u32> {
    exp["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}

/// The L2 norm of an f32 tensor.
pub fn l2(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

/// Max |a − b| over all elements (f32).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Max error of a de-normalised action chunk against the reference chunk of frame `t`.
pub fn chunk_error(actions: &[[f32; 3]], exp: &HashMap<String, Tensor>, t: usize) -> f32 {
    let want = exp["actions"].get(t).unwrap().to_vec2::<f32>().unwrap();
    actions
        .iter()
        .zip(&want)
        .map(|(g, w)| max_abs_slice(g, w))
        .fold(0.0, f32::max)
}

pub fn max_abs_slice(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies a fixture folder to a temp dir so a test can damage it.
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}
