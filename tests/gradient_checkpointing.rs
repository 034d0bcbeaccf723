//! Gradient checkpointing (`train_setup.gradient_checkpointing`) changes memory, not results: on
//! the tiny fixture policy the gradients of one training batch, and the parameters after an AdamW
//! step, equal those of the plain backward, for full fine-tuning and for the last text layer only
//! (frozen weights get no gradient either way), with train-mode dropout off and on (the
//! recomputation replays the forward's masks).

mod policy_common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use mobile_vla::config::TrainSetup;
use mobile_vla::model::model_dir::POLICY_FILE;
use mobile_vla::model::policy::Policy;
use mobile_vla::model::PolicyConfig;
use mobile_vla::train::accumulate::Accumulator;
use mobile_vla::train::loss::{action_loss, Batch};
use mobile_vla::train::optim::AdamW;
use mobile_vla::train::params::{ModelFiles, ParamSet};
use policy_common::{input_ids, l2, policy_fixtures};
use std::collections::HashMap;

/// Relative tolerance: the two backwards sum the same terms in a different order (the training
/// layer norm's own backward reduces per row: up to 1.6e-6 seen with every layer training), and
/// with frozen layers the checkpointed forward runs a frozen layer on a detached input, where
/// candle's fused layer-norm and softmax kernels round differently (up to 6e-6). A replayed
/// dropout mask off by one call differs by ~0.6.
const TOL: f32 = 1e-5;
const MASK_SEED: u64 = 7;

/// The native fixture policy with `setup`, every dropout of both towers at `p`.
fn build(s: &TrainSetup, p: f64) -> (Policy, ParamSet) {
    let dir = policy_fixtures().join("native");
    let cfg = PolicyConfig::from_file(&dir.join(POLICY_FILE)).unwrap();
    let mut files = ModelFiles::read(&dir).unwrap();
    let (t, v) = (
        &mut files.backbone.text_config,
        &mut files.backbone.vision_config,
    );
    (t.dropout, t.attention_dropout, t.activation_dropout) = (p, p, p);
    v.attention_dropout = p;
    files.build(cfg, s, true, 0).unwrap()
}

/// The trainer parity fixture's first batch (2 windows of the native policy).
fn batch() -> Batch {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/train/expected.safetensors");
    let exp: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let ids = input_ids(&exp);
    let k = |name: &str| exp[&format!("native.batch0.{name}")].clone();
    let pixel_values = k("pixel_values");
    Batch {
        token_ids: vec![ids; pixel_values.dim(0).unwrap()],
        pixel_values,
        labels: k("labels"),
        gripper_labels: k("gripper_labels"),
        mask: k("mask"),
        episodes: vec![],
    }
}

/// One train-mode forward + backward of `batch`.
fn gradients(policy: &Policy, params: &[Var], batch: &Batch, checkpointing: bool) -> GradStore {
    let train = policy.backbone().train_mode();
    train.set_checkpointing(checkpointing);
    train.enable(MASK_SEED);
    let out = policy
        .forward_window(&batch.pixel_values, &batch.token_ids)
        .unwrap();
    let loss = action_loss(&out, batch, 0.01).unwrap();
    train.backward(&loss.total, params).unwrap()
}

fn check(case: &str, s: TrainSetup, p: f64, tol: f32) {
    let batch = batch();
    let (policy, params) = build(&s, p);
    let trainable: Vec<_> = params.trainable().collect();
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| (*v).clone()).collect();
    let plain = gradients(&policy, &vars, &batch, false);
    let ckpt = gradients(&policy, &vars, &batch, true);
    let grad = |store: &GradStore, name: &str| {
        let var = trainable.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        var.and_then(|v| store.get(v.as_tensor()).cloned())
    };
    for (name, _) in &trainable {
        let (Some(a), Some(b)) = (grad(&ckpt, name), grad(&plain, name)) else {
            panic!("{case}: `{name}` has no gradient with or without checkpointing");
        };
        // A key bias cannot change the attention (softmax ignores a constant per query): its
        // gradient is 0 up to rounding, so only its size against the query bias's is comparable.
        let scale = match name.strip_suffix("k_proj.bias") {
            Some(layer) => l2(&grad(&plain, &format!("{layer}q_proj.bias")).unwrap()),
            None => l2(&b),
        };
        let err = l2(&(&a - &b).unwrap()) / scale;
        assert!(
            err <= tol,
            "{case}: gradient of `{name}` differs by {err:e}"
        );
    }
    // Frozen weights get no gradient; nor do the checkpoint leaves stay behind.
    for p in params.params.iter().filter(|p| p.var.is_none()) {
        for (store, label) in [(&plain, "plain"), (&ckpt, "checkpointed")] {
            assert!(
                store.get(&p.tensor).is_none(),
                "{case}: frozen `{}` got a gradient ({label})",
                p.name
            );
        }
    }

    // Nor does the checkpointed backward keep more than the plain one (constants' gradients).
    assert!(ckpt.get_ids().count() <= plain.get_ids().count(), "{case}");

    // One AdamW step from each, on fresh copies of the model.
    let stepped = |checkpointing: bool| {
        let (policy, params) = build(&s, p);
        policy
            .backbone()
            .train_mode()
            .set_checkpointing(checkpointing);
        policy.backbone().train_mode().enable(MASK_SEED);
        let vars: Vec<_> = params.trainable().map(|(_, v)| v.clone()).collect();
        let mut opt = AdamW::new(&vars, 0.01).unwrap();
        let mut group = Accumulator::new(&vars, 1);
        group.add(&policy, &vars, &batch, 0.01, 0).unwrap();
        group.apply(&mut opt, &vars, Some(1.0), 1e-3).unwrap();
        params
    };
    let (a, b) = (stepped(true), stepped(false));
    for ((name, va), (_, vb)) in a.trainable().zip(b.trainable()) {
        let err = l2(&(va.as_tensor() - vb.as_tensor()).unwrap()) / l2(vb.as_tensor());
        // AdamW normalises the key bias's rounding-noise gradient (its true gradient is zero:
        // softmax ignores a shift shared by a row's scores) into a full-size step (as in
        // train_parity): only that drift's size is comparable. Measured up to 1.0e-3.
        let tol = if name.ends_with("k_proj.bias") {
            2e-3
        } else {
            tol
        };
        assert!(
            err <= tol,
            "{case}: `{name}` after one step differs by {err:e}"
        );
    }
}

#[test]
fn checkpointed_gradients_equal_plain_ones_full_finetuning() {
    let full = TrainSetup::layers(false, -1, true, true);
    check("full, dropout 0", full.clone(), 0.0, TOL);
    check("full, dropout 0.1", full, 0.1, TOL);
}

#[test]
fn checkpointed_gradients_equal_plain_ones_last_layer() {
    let last = TrainSetup::layers(false, 1, false, false);
    check("last-1, dropout 0", last.clone(), 0.0, TOL);
    check("last-1, dropout 0.1", last, 0.1, TOL);
}
