//! Policy parity against the PyTorch reference (test/fixtures/gen_policy.py): tokenizer, PIL bicubic
//! preprocessing, per-frame [ACT] features, the LSTM head in both history regimes, the training
//! window forward and its gradients (torch autograd), and the de-normalised actions of a 6-step
//! rollout (window 3).

mod policy_common;

use mobile_vla::model::head::History;
use mobile_vla::model::preprocess;
use mobile_vla::model::Policy;
use policy_common::*;

const TOL: f32 = 1e-4;

/// The training forward over the first `window_size` fixture frames, as one sample.
fn forward_first_window(
    policy: &Policy,
    exp: &std::collections::HashMap<String, candle_core::Tensor>,
) -> mobile_vla::model::head::HeadOutput {
    let w = policy.config().window_size;
    let ids = policy.encode_instruction(INSTRUCTION).unwrap();
    let pv = exp["pixel_values"]
        .narrow(0, 0, w)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    policy.forward_window(&pv, &[ids]).unwrap()
}

fn load(name: &str) -> Policy {
    Policy::load(&policy_fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn tokenizer_matches_python_tokenizers() {
    for name in ["native", "robovlms7"] {
        let exp = expected(name);
        let ids: Vec<u32> = exp["input_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(
            load(name).encode_instruction(INSTRUCTION).unwrap(),
            ids,
            "{name}"
        );
    }
}

#[test]
fn bicubic_resize_is_pil_exact_and_pixels_match() {
    for name in ["native", "robovlms7"] {
        let exp = expected(name);
        let policy = load(name);
        let s = policy.image_size();
        let bgr = name == "robovlms7";
        for t in 0..FRAMES {
            let mut img = frame(t);
            let pv = policy.pixel_values(&img).unwrap();
            let err = max_abs(
                &pv,
                &exp["pixel_values"].get(t).unwrap().unsqueeze(0).unwrap(),
            );
            assert!(err <= 1e-6, "{name} frame {t}: pixel_values err {err}");
            if bgr {
                img.pixels_mut().for_each(|p| p.0.swap(0, 2));
            }
            let ours = preprocess::resize_bicubic(&img, s as u32, s as u32);
            let theirs = exp["resized"]
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            assert_eq!(
                ours.as_raw(),
                &theirs,
                "{name} frame {t}: resize differs from PIL"
            );
        }
    }
}

/// Runs the full rollout and checks features, head outputs and actions; returns the max errors.
fn rollout(name: &str) -> (f32, f32, f32) {
    let exp = expected(name);
    let mut policy = load(name);
    let ids = policy.encode_instruction(INSTRUCTION).unwrap();

    // Features per frame.
    let mut feat_err = 0f32;
    for t in 0..FRAMES {
        let pv = exp["pixel_values"].get(t).unwrap().unsqueeze(0).unwrap();
        let f = policy.frame_features(&pv, &ids).unwrap();
        feat_err = feat_err.max(max_abs(
            &f.squeeze(0).unwrap(),
            &exp["features"].get(t).unwrap(),
        ));
    }

    // Head on the reference features, through both history regimes.
    let mut head_err = 0f32;
    let mut history = History::default();
    for t in 0..FRAMES {
        let f = exp["features"].get(t).unwrap().unsqueeze(0).unwrap();
        let out = policy.head().step(&mut history, &f).unwrap();
        head_err = head_err.max(max_abs(
            &out.actions.squeeze(0).unwrap().squeeze(0).unwrap(),
            &exp["head_actions"].get(t).unwrap(),
        ));
        if let Some(g) = &out.gripper {
            head_err = head_err.max(max_abs(
                &g.flatten_all().unwrap(),
                &exp["head_gripper"].get(t).unwrap(),
            ));
        }
        assert_eq!(history.len(), (t + 1).min(policy.config().window_size));
    }

    // End to end: images → actions.
    policy.reset();
    let mut act_err = 0f32;
    for t in 0..FRAMES {
        let chunk = policy.step(&frame(t), INSTRUCTION).unwrap();
        let want = exp["actions"].get(t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(chunk.actions.len(), want.len());
        for (got, want) in chunk.actions.iter().zip(&want) {
            act_err = act_err.max(max_abs_slice(got, want));
        }
        act_err = act_err.max(max_abs_slice(
            &chunk.raw,
            &exp["raw"].get(t).unwrap().to_vec1::<f32>().unwrap(),
        ));
        assert_eq!(chunk.dt, 0.4);
    }
    // reset() really forgets: the first step again gives the first step's actions.
    policy.reset();
    let again = policy.step(&frame(0), INSTRUCTION).unwrap();
    let first = exp["actions"].get(0).unwrap().to_vec2::<f32>().unwrap();
    assert!(max_abs_slice(&again.actions[0], &first[0]) <= TOL);

    eprintln!(
        "{name}: max abs err features {feat_err:.2e}, head {head_err:.2e}, actions {act_err:.2e}"
    );
    assert!(feat_err <= TOL, "{name}: features err {feat_err}");
    assert!(head_err <= TOL, "{name}: head err {head_err}");
    assert!(act_err <= TOL, "{name}: actions err {act_err}");
    (feat_err, head_err, act_err)
}

#[test]
fn native_rollout_matches_reference() {
    rollout("native");
}

#[test]
fn robovlms7_rollout_matches_reference() {
    rollout("robovlms7");
}

#[test]
fn training_window_forward_matches_reference() {
    for name in ["native", "robovlms7"] {
        let exp = expected(name);
        let policy = load(name);
        let out = forward_first_window(&policy, &exp);
        let err = max_abs(&out.actions, &exp["window_actions"]);
        assert!(err <= TOL, "{name}: window actions err {err}");
        if let Some(g) = &out.gripper {
            let err = max_abs(g, &exp["window_gripper"]);
            assert!(err <= TOL, "{name}: window gripper err {err}");
        }
    }
}

#[test]
fn training_gradients_match_torch_autograd() {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use mobile_vla::model::kosmos2::Kosmos2Config;
    use mobile_vla::model::tokenizer::PromptTokenizer;
    use mobile_vla::model::PolicyConfig;

    for name in ["native", "robovlms7"] {
        let dir = policy_fixtures().join(name);
        let exp = expected(name);
        // A VarMap-backed policy, as the trainer builds it: every weight is a trainable Var.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = PolicyConfig::from_file(&dir.join("policy.json")).unwrap();
        let kcfg = Kosmos2Config::from_file(dir.join("config.json")).unwrap();
        let tok = PromptTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let policy = Policy::new(cfg, &kcfg, tok, vb).unwrap();
        let mut varmap = varmap;
        varmap.load(dir.join("model.safetensors")).unwrap();

        let out = forward_first_window(&policy, &exp);
        let mut loss = out.actions.sum_all().unwrap();
        if let Some(g) = &out.gripper {
            loss = (loss + g.sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for key in exp.keys().filter(|k| k.starts_with("grad.")) {
            let var_name = &key["grad.".len()..];
            let var = vars
                .get(var_name)
                .unwrap_or_else(|| panic!("no var {var_name}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {var_name}"));
            let want = &exp[key];
            // Relative to the gradient's magnitude (at least 1): some reach ~1e2 on the tiny model.
            let zero = want.zeros_like().unwrap();
            let err = max_abs(got, want) / max_abs(want, &zero).max(1.0);
            eprintln!("{name}: grad {var_name} rel err {err:.2e}");
            assert!(err <= 1e-4, "{name}: grad {var_name} err {err}");
        }
    }
}

#[test]
fn reduced_precision_weights_stay_close() {
    use candle_core::{DType, Device};
    use mobile_vla::model::LoadOptions;
    use mobile_vla::model::WeightFormat;
    let exp = expected("native");
    for (dtype, format) in [
        (DType::BF16, WeightFormat::F32),
        (DType::F16, WeightFormat::F32),
        (DType::F32, WeightFormat::I16),
    ] {
        let opts = LoadOptions {
            dtype,
            device: Device::Cpu,
            packing: Some(format),
        };
        let mut policy = Policy::load_with(&policy_fixtures().join("native"), &opts).unwrap();
        let mut err = 0f32;
        for t in 0..FRAMES {
            let chunk = policy.step(&frame(t), INSTRUCTION).unwrap();
            err = err.max(chunk_error(&chunk.actions, &exp, t));
        }
        eprintln!("{dtype:?} {format:?}: max abs action err {err:.2e}");
        // Actions span ±1.15; bf16 keeps ~3 significant digits, 12-bit blocks ~4.
        let tol = if format == WeightFormat::I16 {
            5e-3
        } else {
            0.05
        };
        assert!(err < tol, "{dtype:?} {format:?}: {err}");
    }
}
