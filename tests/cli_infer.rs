//! The `mobile_vla infer` / `model import` / `model info` contract, through the real binary.

mod policy_common;

use policy_common::*;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mobile_vla"))
}

fn infer(model: &std::path::Path) -> serde_json::Value {
    infer_as(model, "f32")
}

fn infer_as(model: &std::path::Path, dtype: &str) -> serde_json::Value {
    let mut cmd = bin();
    cmd.args(["infer", "--model"]).arg(model).args([
        "--instruction",
        INSTRUCTION,
        "--dtype",
        dtype,
    ]);
    for t in 0..FRAMES {
        cmd.arg("--image").arg(frame_path(t));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn check_against_reference(json: &serde_json::Value, name: &str) {
    let err = error_vs_reference(json, name);
    eprintln!("{name} via CLI: max abs err {err:.2e}");
    assert!(err <= 1e-4, "{name}: {err}");
}

/// Largest difference of the printed actions and raw step-0 outputs from the PyTorch reference.
fn error_vs_reference(json: &serde_json::Value, name: &str) -> f32 {
    let exp = expected(name);
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(steps.len(), FRAMES);
    let mut err = 0f32;
    for (t, step) in steps.iter().enumerate() {
        let want = exp["actions"].get(t).unwrap().to_vec2::<f32>().unwrap();
        let got: Vec<Vec<f32>> = serde_json::from_value(step["actions"].clone()).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), 3);
            err = err.max(max_abs_slice(g, w));
        }
        let raw: Vec<f32> = serde_json::from_value(step["raw"].clone()).unwrap();
        err = err.max(max_abs_slice(
            &raw,
            &exp["raw"].get(t).unwrap().to_vec1::<f32>().unwrap(),
        ));
        assert_eq!(step["dt"].as_f64().map(|v| v as f32), Some(0.4));
    }
    err
}

#[test]
fn infer_prints_reference_actions() {
    check_against_reference(&infer(&policy_fixtures().join("native")), "native");
}

#[test]
fn half_precision_dtypes_compute_in_half_precision() {
    // Before, `--dtype f16|bf16` asked for the f32 packing; now they run candle's half-precision
    // matmul, so they differ from the f32 reference, by the rounding of their format.
    let model = policy_fixtures().join("native");
    for (dtype, tol) in [("bf16", 5e-2), ("f16", 1e-2)] {
        let err = error_vs_reference(&infer_as(&model, dtype), "native");
        eprintln!("{dtype} via CLI: max abs err {err:.2e}");
        assert!(err > 0.0 && err < tol, "{dtype}: max abs err {err}");
    }
}

#[test]
fn import_then_infer_and_info() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("imported");
    let out = bin()
        .args(["model", "import"])
        .arg(policy_fixtures().join("robovlms7.ckpt"))
        .arg("--hf-model")
        .arg(policy_fixtures().join("hf_robovlms7"))
        .arg("--out")
        .arg(&out_dir)
        .args(["--model-channel-order", "bgr"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("model.unrelated.weight"), "{stdout}");
    assert!(stdout.contains("text_model.lm_head.weight"), "{stdout}");
    check_against_reference(&infer(&out_dir), "robovlms7");

    let info = bin()
        .args(["model", "info"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success());
    for component in [
        "vision",
        "projection",
        "text",
        "action_token",
        "act_head",
        "total",
    ] {
        assert!(text.contains(component), "{component} missing in:\n{text}");
    }
}

/// `stderr`'s error line, checked to hold `cause` exactly once (error chains used to repeat it).
fn error_with_cause_once(out: &std::process::Output, cause: &str) -> String {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.matches(cause).count(),
        1,
        "`{cause}` once in: {stderr}"
    );
    stderr
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let out = bin()
        .args(["infer", "--model"])
        .arg(policy_fixtures().join("native"))
        .args(["--instruction", "go", "--image", "/nonexistent.png"])
        .output()
        .unwrap();
    let err = error_with_cause_once(&out, "(os error 2)");
    assert!(err.contains("/nonexistent.png"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let not_png = tmp.path().join("frame.png");
    std::fs::write(&not_png, b"not an image").unwrap();
    let out = bin()
        .args(["infer", "--model"])
        .arg(policy_fixtures().join("native"))
        .args(["--instruction", "go", "--image"])
        .arg(&not_png)
        .output()
        .unwrap();
    let err = error_with_cause_once(&out, "signature");
    assert!(err.contains("frame.png"), "{err}");

    let out = bin()
        .args([
            "infer",
            "--model",
            "/nonexistent",
            "--instruction",
            "go",
            "--image",
            "x.png",
        ])
        .output()
        .unwrap();
    let err = error_with_cause_once(&out, "(os error 2)");
    assert!(err.contains("/nonexistent"), "{err}");
}
