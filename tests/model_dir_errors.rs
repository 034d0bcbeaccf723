//! A damaged model directory gives an error naming the tensor, field or file at fault, never a panic.

mod policy_common;

use mobile_vla::model::Policy;
use policy_common::*;
use std::collections::HashMap;
use std::path::Path;

fn damaged(edit: impl FnOnce(&Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&policy_fixtures().join("native"), tmp.path());
    edit(tmp.path());
    match Policy::load(tmp.path()) {
        Ok(_) => panic!("damaged model dir loaded"),
        Err(e) => e.to_string(),
    }
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, candle_core::Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let err = damaged(|d| edit_tensors(d, |t| drop(t.remove("act_head.rnn.bias_hh_l1"))));
    assert!(err.contains("act_head.rnn.bias_hh_l1"), "{err}");
    let err = damaged(|d| edit_tensors(d, |t| drop(t.remove("action_token"))));
    assert!(err.contains("action_token"), "{err}");
}

#[test]
fn extra_tensor_is_named() {
    let err = damaged(|d| {
        edit_tensors(d, |t| {
            t.insert(
                "act_head.fc.weight".into(),
                candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap(),
            );
        })
    });
    assert!(err.contains("act_head.fc.weight"), "{err}");
}

#[test]
fn shape_mismatch_is_named() {
    let err = damaged(|d| {
        edit_tensors(d, |t| {
            t.insert(
                "act_head.actions.mlp.6.weight".into(),
                candle_core::Tensor::zeros(
                    (5, 12),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            );
        })
    });
    assert!(err.contains("act_head.actions.mlp.6.weight"), "{err}");
}

#[test]
fn truncated_weights_name_the_file() {
    let err = damaged(|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    });
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn policy_json_problems_name_the_field() {
    fn patch(f: impl Fn(&mut serde_json::Value)) -> impl FnOnce(&Path) {
        move |d: &Path| {
            let p = d.join("policy.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        }
    }
    let err = damaged(patch(|v: &mut serde_json::Value| {
        v["chunk_size"] = 3.into()
    }));
    assert!(
        err.contains("chunk_size") && err.contains("policy.json"),
        "{err}"
    );
    let err = damaged(patch(|v: &mut serde_json::Value| {
        v["action"]["robot_indices"] = serde_json::json!([0, 1, 7])
    }));
    assert!(err.contains("robot_indices"), "{err}");
    let err = damaged(patch(|v: &mut serde_json::Value| v["dt"] = (-1.0).into()));
    assert!(err.contains("dt"), "{err}");
    let err = damaged(patch(|v: &mut serde_json::Value| {
        v["head"]["hidden_size"] = 13.into()
    }));
    assert!(err.contains("act_head.rnn.weight_ih_l0"), "{err}");
}

#[test]
fn missing_files_are_named() {
    for f in [
        "policy.json",
        "tokenizer.json",
        "model.safetensors",
        "config.json",
    ] {
        let err = damaged(|d| std::fs::remove_file(d.join(f)).unwrap());
        assert!(err.contains(f), "{f}: {err}");
    }
}

#[test]
fn non_finite_weights_are_reported_in_every_weight_format() {
    // A NaN in a packed linear weight: 12-bit integers cannot hold it, and the i16 packing used to
    // round it to 0, so the policy printed finite actions from a corrupt model.
    use mobile_vla::model::{LoadOptions, WeightFormat};
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&policy_fixtures().join("native"), tmp.path());
    edit_tensors(tmp.path(), |t| {
        let name = "text_model.model.layers.0.ffn.fc2.weight";
        let w = &t[name];
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[7] = f32::NAN;
        let w = candle_core::Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu).unwrap();
        t.insert(name.into(), w);
    });
    for format in [WeightFormat::F32, WeightFormat::I16] {
        let opts = LoadOptions {
            packing: Some(format),
            ..LoadOptions::default()
        };
        let mut policy = Policy::load_with(tmp.path(), &opts).unwrap();
        match policy.step(&frame(0), INSTRUCTION) {
            Err(mobile_vla::model::error::ModelError::NonFiniteAction { .. }) => {}
            other => panic!("{format:?}: expected a non-finite action error, got {other:?}"),
        }
    }
}
