//! LoRA (SEED 6.2) as peft's `LoraConfig(r, lora_alpha, lora_dropout, bias,
//! target_modules="all-linear")` applied to the Kosmos-2 backbone, as RoboVLMs'
//! `setup_lora_model` does.
//!
//! Every linear layer of the backbone (vision tower, image-to-text projection, text decoder; not
//! the output head `lm_head`, which "all-linear" leaves out and the policy does not load) computes
//! `y = W·x + b + scale · B·A·dropout(x)` with `scale = lora_alpha / r`, `A (r, in)` drawn as
//! `nn.init.kaiming_uniform_(A, a=√5)` does (uniform in ±1/√in), `B (out, r)` zeros (so training
//! starts from the base model), and dropout on the adapter's input only, in train mode only.
//! `W` and `b` stay frozen plain tensors: no gradient is computed for them (`model::fused`'s
//! training ops compute only tracked tensors' gradients, and fuse the frozen base layer into the
//! adapter's op). Which biases train (`lora_bias`) is decided with the other `requires_grad` rules
//! in [`super::params`].
//!
//! Adapter tensors are named after their layer, `<HF module name>.lora_A.weight` and
//! `.lora_B.weight` (peft's names without its `base_model.model.` prefix and adapter name).
//! [`merge`] folds them into the base weights, `W + scale·B·A` (peft's `merge_and_unload`), when
//! the trained model directory is written, so serving pays nothing for them.

use super::params::{Group, Param};
use crate::config::train::LoraSetup;
use crate::model::fused;
use crate::model::kosmos2::{LinearAdapter, TrainMode};
use crate::model::Policy;
use candle_core::{DType, Module, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

pub const A_SUFFIX: &str = ".lora_A.weight";
pub const B_SUFFIX: &str = ".lora_B.weight";

/// peft's `scaling`: `lora_alpha / r`.
pub fn scale(lora: &LoraSetup) -> f64 {
    lora.alpha / lora.r as f64
}

/// One layer's `scale · B·A·dropout(x)`.
#[derive(Debug)]
struct Adapter {
    a: candle_nn::Linear,
    b: candle_nn::Linear,
    scale: f64,
    dropout: f64,
    train: Arc<TrainMode>,
}

impl LinearAdapter for Adapter {
    fn forward_with_base(&self, base: &candle_nn::Linear, xs: &Tensor) -> Option<Result<Tensor>> {
        let (a, b, w, bias) = (
            self.a.weight(),
            self.b.weight(),
            base.weight(),
            base.bias()?,
        );
        let fits = fused::needs_grad(&[xs, a, b])
            && !fused::needs_grad(&[w, bias])
            && fused::applies(&[xs, a, b, w, bias]);
        fits.then(|| {
            let dropout = self.train.dropout_mask(self.dropout);
            fused::lora_linear(xs, (w, bias), a, b, self.scale as f32, dropout)
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.a.weight(), self.b.weight());
        if fused::needs_grad(&[xs, a, b]) && fused::applies(&[xs, a, b]) {
            let dropout = self.train.dropout_mask(self.dropout);
            return fused::lora(xs, a, b, self.scale as f32, dropout);
        }
        let x = self.train.dropout(xs, self.dropout)?;
        // Scaled at rank r rather than at the layer's width: the autograd graph keeps each op's
        // input, so this saves one output-sized activation per adapted layer.
        self.b.forward(&(self.a.forward(&x)? * self.scale)?)
    }
}

/// Gives every linear layer of `policy`'s backbone an adapter and returns the adapter parameters
/// (trainable, in layer order, A before B). `seed` draws the A matrices.
pub fn attach(policy: &mut Policy, lora: &LoraSetup, seed: u64) -> Result<Vec<Param>> {
    let train = policy.backbone().train_mode().clone();
    let (r, scale, dropout) = (lora.r, scale(lora), lora.dropout);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4C6F_5241_A11E_D0A7);
    let mut params = Vec::new();
    policy.backbone_mut().adapt_linears(&mut |name, w| {
        let (out, inp) = w.dims2()?;
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (r, inp), w.device())?.to_dtype(w.dtype())?;
        let a = Var::from_tensor(&a)?;
        let b = Var::zeros((out, r), w.dtype(), w.device())?;
        for (suffix, v) in [(A_SUFFIX, &a), (B_SUFFIX, &b)] {
            params.push(Param {
                name: format!("{name}{suffix}"),
                group: Group::Lora,
                var: Some(v.clone()),
                tensor: v.as_tensor().clone(),
            });
        }
        Ok(Some(Arc::new(Adapter {
            a: candle_nn::Linear::new(a.as_tensor().clone(), None),
            b: candle_nn::Linear::new(b.as_tensor().clone(), None),
            scale,
            dropout,
            train: train.clone(),
        })))
    })?;
    Ok(params)
}

/// Folds every adapter in `tensors` into its layer's weight, `W ← W + scale·B·A` (computed in
/// f32, stored in `W`'s dtype), and removes the adapter tensors. Returns how many were merged.
pub fn merge(tensors: &mut HashMap<String, Tensor>, scale: f64) -> Result<usize> {
    let layers: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(A_SUFFIX).map(str::to_owned))
        .collect();
    for layer in &layers {
        let mut take = |name: String| {
            tensors
                .remove(&name)
                .ok_or(candle_core::Error::CannotFindTensor { path: name })
        };
        let a = take(format!("{layer}{A_SUFFIX}"))?;
        let b = take(format!("{layer}{B_SUFFIX}"))?;
        let w_name = format!("{layer}.weight");
        let w = take(w_name.clone())?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        tensors.insert(w_name, merged);
    }
    if let Some(stray) = tensors.keys().find(|n| n.ends_with(B_SUFFIX)) {
        candle_core::bail!("LoRA tensor `{stray}` has no matching lora_A");
    }
    Ok(layers.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainSetup;
    use crate::model::model_dir::POLICY_FILE;
    use crate::model::PolicyConfig;
    use crate::train::params::ModelFiles;
    use candle_core::Device;
    use std::path::Path;

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let a: Vec<f32> = (0..8).map(|i| (i as f32).sin()).collect();
        let b: Vec<f32> = (0..6).map(|i| (i as f32).cos()).collect();
        let mut tensors = HashMap::from([
            (
                "l.weight".to_owned(),
                Tensor::from_vec(w.clone(), (3, 4), &dev).unwrap(),
            ),
            (
                "l.bias".to_owned(),
                Tensor::zeros(3, DType::F32, &dev).unwrap(),
            ),
            (
                format!("l{A_SUFFIX}"),
                Tensor::from_vec(a.clone(), (2, 4), &dev).unwrap(),
            ),
            (
                format!("l{B_SUFFIX}"),
                Tensor::from_vec(b.clone(), (3, 2), &dev).unwrap(),
            ),
        ]);
        assert_eq!(merge(&mut tensors, 2.5).unwrap(), 1);
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["l.bias", "l.weight"], "adapters removed");
        let merged = tensors["l.weight"].to_vec2::<f32>().unwrap();
        for (o, row) in merged.iter().enumerate() {
            for (i, &got) in row.iter().enumerate() {
                let ba: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 4 + i]).sum();
                let want = w[o * 4 + i] + 2.5 * ba;
                assert!((got - want).abs() < 1e-6, "[{o}, {i}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn merge_names_a_missing_half() {
        let dev = Device::Cpu;
        let mut tensors = HashMap::from([
            (
                "l.weight".to_owned(),
                Tensor::zeros((3, 4), DType::F32, &dev).unwrap(),
            ),
            (
                format!("l{A_SUFFIX}"),
                Tensor::zeros((2, 4), DType::F32, &dev).unwrap(),
            ),
        ]);
        let e = merge(&mut tensors, 1.0).unwrap_err().to_string();
        assert!(e.contains("l.lora_B.weight"), "{e}");
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The adapted model (B non-zero) and the plain model on merged weights compute the same
    /// features: serving the merged directory is serving the trained adapters.
    #[test]
    fn merged_weights_serve_what_the_adapters_trained() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/policy/native");
        let cfg = PolicyConfig::from_file(&dir.join(POLICY_FILE)).unwrap();
        let lora = LoraSetup {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            bias: "none".into(),
        };
        let setup = TrainSetup {
            lora: Some(lora.clone()),
            ..TrainSetup::layers(true, -1, false, false)
        };
        let files = ModelFiles::read(&dir).unwrap();
        let (adapted, params) = files.build(cfg.clone(), &setup, true, 7).unwrap();
        let adapters: Vec<_> = params
            .trainable()
            .filter(|(n, _)| n.ends_with(B_SUFFIX))
            .collect();
        // One adapter per linear: 6 per layer of both towers (2 + 2 here) and 5 in the projection.
        assert_eq!(adapters.len(), 4 * 6 + 5);
        for (i, (_, b)) in adapters.iter().enumerate() {
            let r = Tensor::randn(0f32, 0.3, b.shape(), &Device::Cpu).unwrap();
            b.set(&(r + i as f64 * 0.01).unwrap()).unwrap();
        }
        let size = adapted.image_size();
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, size, size), &Device::Cpu).unwrap();
        let ids = adapted.encode_instruction("go to the red box").unwrap();
        // Train-mode dropout is off after construction, as in inference.
        let want = adapted.frame_features(&pixels, &ids).unwrap();

        let mut tensors = params.tensors();
        assert_eq!(merge(&mut tensors, scale(&lora)).unwrap(), 29);
        let mut files = ModelFiles::read(&dir).unwrap();
        files.tensors = tensors;
        let frozen = TrainSetup {
            lora: None,
            ..setup
        };
        let (merged, _) = files.build(cfg, &frozen, true, 0).unwrap();
        let got = merged.frame_features(&pixels, &ids).unwrap();
        let diff = max_abs(&(got - &want).unwrap());
        assert!(diff <= 1e-5 * max_abs(&want).max(1.0), "max |Δ| {diff}");
        let base = ModelFiles::read(&dir).unwrap();
        let (plain, _) = base
            .build(
                PolicyConfig::from_file(&dir.join(POLICY_FILE)).unwrap(),
                &frozen,
                true,
                0,
            )
            .unwrap();
        let untouched = plain.frame_features(&pixels, &ids).unwrap();
        let moved = max_abs(&(untouched - &want).unwrap());
        assert!(
            moved > 1e-3,
            "the adapters must change the features (moved {moved})"
        );
    }
}
