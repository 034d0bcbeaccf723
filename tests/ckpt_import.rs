//! RoboVLMs / Mobile VLA checkpoint import: the imported policy reproduces the PyTorch reference
//! actions; the report names ignored and dropped keys; bad checkpoints and configs fail clearly and
//! leave nothing behind; export writes RoboVLMs names back.

mod policy_common;

use mobile_vla::data::image::ChannelOrder;
use mobile_vla::model::export::export_robovlms;
use mobile_vla::model::import::{import_robovlms, ConfigSource, ImportOptions, ImportReport};
use mobile_vla::model::robovlms::{map_ckpt_key, robovlms_key};
use mobile_vla::model::Policy;
use policy_common::*;
use std::path::{Path, PathBuf};

fn opts(config: Option<PathBuf>) -> ImportOptions {
    ImportOptions {
        config,
        robot_indices: None,
        dt: 0.4,
        // The reference model was fed channel-swapped frames (a fork checkpoint trained on BGR).
        model_channel_order: ChannelOrder::Bgr,
    }
}

fn import(
    ckpt: &str,
    hf: &Path,
    out: &Path,
    config: Option<PathBuf>,
) -> mobile_vla::model::error::Result<ImportReport> {
    import_robovlms(&policy_fixtures().join(ckpt), hf, out, &opts(config))
}

/// Rolls the imported policy over the fixture frames and returns the max error vs the reference.
fn rollout_error(dir: &Path) -> f32 {
    let exp = expected("robovlms7");
    let mut policy = Policy::load(dir).unwrap();
    let mut err = 0f32;
    for t in 0..FRAMES {
        let chunk = policy.step(&frame(t), INSTRUCTION).unwrap();
        err = err.max(chunk_error(&chunk.actions, &exp, t));
        err = err.max(max_abs_slice(
            &chunk.raw,
            &exp["raw"].get(t).unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    err
}

#[test]
fn lightning_ckpt_imports_and_reproduces_reference_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let report = import(
        "robovlms7.ckpt",
        &policy_fixtures().join("hf_robovlms7"),
        &out,
        None,
    )
    .unwrap();
    assert!(matches!(
        report.config_source,
        ConfigSource::CheckpointHyperParameters
    ));
    assert_eq!(report.unmatched, vec!["model.unrelated.weight".to_string()]);
    assert_eq!(report.unused, vec!["text_model.lm_head.weight".to_string()]);
    assert!(report.from_hf.is_empty());
    assert_eq!(report.policy.action.robot_indices, [0, 1, 5]);
    assert_eq!(report.policy.head.num_layers, 3);
    let err = rollout_error(&out);
    eprintln!("imported .ckpt: max abs action err {err:.2e}");
    assert!(err <= 1e-4, "imported policy err {err}");
}

#[test]
fn partial_state_dict_takes_backbone_from_hf_and_config_from_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let hf = policy_fixtures().join("hf_robovlms7");
    let config = policy_fixtures().join("robovlms7_config.json");
    let report = import("robovlms7_partial.pt", &hf, &out, Some(config)).unwrap();
    assert!(!report.from_hf.is_empty());
    assert!(
        report
            .from_hf
            .iter()
            .all(|n| n.starts_with("vision_model.")),
        "{:?}",
        report.from_hf
    );
    assert!(rollout_error(&out) <= 1e-4);
}

#[test]
fn missing_config_and_missing_backbone_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = policy_fixtures().join("hf_robovlms7");
    let err = import("robovlms7_partial.pt", &hf, &tmp.path().join("a"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--config"), "{err}");

    // An HF folder without weights cannot supply the vision tower the checkpoint lacks.
    let bare = tmp.path().join("hf_bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(hf.join(f), bare.join(f)).unwrap();
    }
    let config = policy_fixtures().join("robovlms7_config.json");
    let err = import(
        "robovlms7_partial.pt",
        &bare,
        &tmp.path().join("b"),
        Some(config),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("vision_model."), "{err}");
    assert!(!tmp.path().join("b").exists());
}

#[test]
fn truncated_ckpt_fails_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(policy_fixtures().join("robovlms7.ckpt")).unwrap();
    let cut = tmp.path().join("cut.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("model");
    let err = import_robovlms(
        &cut,
        &policy_fixtures().join("hf_robovlms7"),
        &out,
        &opts(None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cut.ckpt"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "temp files left behind"
    );
}

#[test]
fn unsupported_configs_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let base: serde_json::Value = serde_json::from_slice(
        &std::fs::read(policy_fixtures().join("robovlms7_config.json")).unwrap(),
    )
    .unwrap();
    let cases: [(&str, serde_json::Value); 4] = [
        (
            "act_head.type",
            serde_json::json!({"act_head": {"type": "GPTDecoder"}}),
        ),
        ("use_hand_rgb", serde_json::json!({"use_hand_rgb": true})),
        (
            "act_head.hidden_size",
            serde_json::json!({"act_head": {"hidden_size": 1024}}),
        ),
        ("window_size", serde_json::json!({"window_size": "eight"})),
    ];
    for (i, (field, patch)) in cases.into_iter().enumerate() {
        let mut cfg = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            match (cfg.get_mut(k), v) {
                (Some(serde_json::Value::Object(dst)), serde_json::Value::Object(src)) => {
                    dst.extend(src.clone());
                }
                _ => {
                    cfg[k] = v.clone();
                }
            }
        }
        let path = tmp.path().join(format!("cfg{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let out = tmp.path().join(format!("m{i}"));
        let err = import(
            "robovlms7.ckpt",
            &policy_fixtures().join("hf_robovlms7"),
            &out,
            Some(path),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(field), "expected `{field}` in: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn non_empty_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let err = import(
        "robovlms7.ckpt",
        &policy_fixtures().join("hf_robovlms7"),
        tmp.path(),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn export_writes_robovlms_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("robovlms.safetensors");
    let dir = policy_fixtures().join("robovlms7");
    let n = export_robovlms(&dir, &out).unwrap();
    let exported = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let original =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(n, original.len());
    for (name, t) in &original {
        let key = robovlms_key(name);
        let e = exported
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(max_abs(e, t), 0.0, "{key}");
        // Import's key mapping is the inverse.
        assert_eq!(map_ckpt_key(&key).as_deref(), Some(name.as_str()));
    }
    assert!(exported.contains_key("model.action_token"));
    assert!(exported.contains_key("model.act_head.gripper.mlp.6.bias"));
    assert!(exported.contains_key("model.backbone.text_model.model.layer_norm.weight"));
}
