//! The candle Kosmos-2 backbone against transformers' `Kosmos2ForConditionalGeneration`
//! (reference numbers from `test/fixtures/gen_kosmos2.py`), plus loading errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use mobile_vla::model::kosmos2::{Kosmos2, Kosmos2Config, Kosmos2Error};
use mobile_vla::model::WeightFormat;

const TOL: f32 = 1e-4;
const FIXTURES: [&str; 3] = ["tiny_odd_heads", "tiny_even", "tiny_odd_width_noscale"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/kosmos2")
        .join(name)
}

fn load(name: &str, dtype: DType) -> (Kosmos2, HashMap<String, Tensor>) {
    let dir = fixture(name);
    let cfg = Kosmos2Config::from_file(dir.join("config.json")).unwrap();
    let model = Kosmos2::load(&cfg, &[dir.join("model.safetensors")], dtype, &Device::Cpu).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (model, expected)
}

fn max_abs_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let got = got.to_dtype(DType::F32).unwrap();
    (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// RoboVLMs' per-frame sequence: `[<s>] + image_embeds + embed(prompt) + [ACT] + [</s>]`.
fn robo_sequence(
    model: &Kosmos2,
    image_embeds: &Tensor,
    prompt_ids: &Tensor,
    act: &Tensor,
) -> Tensor {
    let text = &model.config().text_config;
    let b = image_embeds.dim(0).unwrap();
    let ids = |id: usize| Tensor::full(id as i64, (b, 1), &Device::Cpu).unwrap();
    let bos = model.embed_tokens(&ids(text.bos_token_id)).unwrap();
    let eos = model.embed_tokens(&ids(text.eos_token_id)).unwrap();
    let prompt = model.embed_tokens(prompt_ids).unwrap();
    let d = text.embed_dim;
    let act = act
        .to_dtype(image_embeds.dtype())
        .unwrap()
        .reshape((1, 1, d))
        .unwrap()
        .broadcast_as((b, 1, d))
        .unwrap();
    Tensor::cat(&[&bos, image_embeds, &prompt, &act, &eos], 1).unwrap()
}

/// Every output of the model on one fixture: `(name, got, want)`.
fn outputs(model: &Kosmos2, exp: &HashMap<String, Tensor>) -> Vec<(&'static str, Tensor, Tensor)> {
    let pixels = &exp["pixel_values"];
    let vision = model.vision_features(pixels).unwrap();
    let image_embeds = model.image_embeds(pixels).unwrap();
    let plain_embeds = model.embed_tokens(&exp["plain_input_ids"]).unwrap();
    let plain_hidden = model.text_hidden_states(&plain_embeds).unwrap();
    let robo_embeds = robo_sequence(model, &image_embeds, &exp["prompt_ids"], &exp["act_embed"]);
    let robo_hidden = model.text_hidden_states(&robo_embeds).unwrap();
    let len = robo_hidden.dim(1).unwrap();
    let act_feature = robo_hidden.i((.., len - 2)).unwrap();
    [
        ("vision_features", vision),
        ("image_embeds", image_embeds),
        ("plain_hidden", plain_hidden),
        ("robo_inputs_embeds", robo_embeds),
        ("robo_hidden", robo_hidden),
        ("act_feature", act_feature),
    ]
    .into_iter()
    .map(|(name, got)| (name, got, exp[name].clone()))
    .collect()
}

/// candle's matmul (trainable weights) and the packed inference GEMM (fused q/k/v) alike.
fn check_parity(name: &str) {
    for packed in [false, true] {
        let (mut model, exp) = load(name, DType::F32);
        if packed {
            model.pack_for_inference(WeightFormat::F32).unwrap();
        }
        for (what, got, want) in outputs(&model, &exp) {
            let err = max_abs_err(&got, &want);
            println!(
                "{name} {what} packed={packed}: max abs err {err:.3e} (|ref| max {:.3})",
                max_abs(&want)
            );
            assert!(err <= TOL, "{name} {what}: max abs err {err} > {TOL}");
        }
    }
}

#[test]
fn parity_tiny_odd_heads() {
    check_parity("tiny_odd_heads");
}

#[test]
fn parity_tiny_even() {
    check_parity("tiny_even");
}

#[test]
fn parity_tiny_odd_width_noscale() {
    check_parity("tiny_odd_width_noscale");
}

/// `last_hidden_state` (only the last row in the last layer) on the sequence cut after [ACT] gives
/// [ACT]'s row of the full forward and of transformers; likewise the plain prompt's last token.
#[test]
fn last_hidden_state_is_the_full_forwards_last_row() {
    for name in FIXTURES {
        let (model, exp) = load(name, DType::F32);
        let image_embeds = model.image_embeds(&exp["pixel_values"]).unwrap();
        let robo = robo_sequence(&model, &image_embeds, &exp["prompt_ids"], &exp["act_embed"]);
        let to_act = robo.narrow(1, 0, robo.dim(1).unwrap() - 1).unwrap();
        let plain = model.embed_tokens(&exp["plain_input_ids"]).unwrap();
        for (what, seq, reference) in [
            ("act_feature", &to_act, exp["act_feature"].clone()),
            (
                "plain last token",
                &plain,
                exp["plain_hidden"]
                    .i((.., plain.dim(1).unwrap() - 1))
                    .unwrap(),
            ),
        ] {
            let got = model.last_hidden_state(seq).unwrap();
            let full = model.text_hidden_states(seq).unwrap();
            let full_last = full.i((.., full.dim(1).unwrap() - 1)).unwrap();
            let err = max_abs_err(&got, &full_last);
            println!("{name} {what}: last-row-only vs full forward max abs err {err:.3e}");
            assert!(
                err < 1e-5,
                "{name} {what}: last_hidden_state differs by {err}"
            );
            let err = max_abs_err(&got, &reference);
            assert!(
                err <= TOL,
                "{name} {what}: max abs err {err} vs transformers > {TOL}"
            );
        }
    }
}

/// Gradients of `sum(act_feature * loss_weight)` w.r.t. every weight and the
/// [ACT] embedding, against torch autograd: the fine-tuning path.
fn check_grads(name: &str) {
    let dir = fixture(name);
    let cfg = Kosmos2Config::from_file(dir.join("config.json")).unwrap();
    let dev = Device::Cpu;
    let vars: HashMap<String, Var> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &dev)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
            .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let model = Kosmos2::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap();
    let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let want = candle_core::safetensors::load(dir.join("grads.safetensors"), &dev).unwrap();

    let act = Var::from_tensor(&exp["act_embed"]).unwrap();
    let image_embeds = model.image_embeds(&exp["pixel_values"]).unwrap();
    let seq = robo_sequence(&model, &image_embeds, &exp["prompt_ids"], act.as_tensor());
    let hidden = model.text_hidden_states(&seq).unwrap();
    let len = hidden.dim(1).unwrap();
    let loss = (hidden.i((.., len - 2)).unwrap() * &want["loss_weight"])
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();

    let mut worst = (0f32, String::new());
    let mut checked = 0;
    for (key, reference) in &want {
        let Some(param) = key.strip_prefix("grad.") else {
            continue;
        };
        let var = if param == "act_embed" {
            &act
        } else {
            &vars[param]
        };
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
        let err = max_abs_err(got, reference) / max_abs(reference).max(1.0);
        assert!(
            err <= TOL,
            "{name} grad {param}: scaled max abs err {err} > {TOL}"
        );
        if err > worst.0 {
            worst = (err, param.to_string());
        }
        checked += 1;
    }
    // Every checkpoint tensor plus [ACT] gets a gradient from the feature.
    assert_eq!(
        checked,
        vars.len() + 1,
        "{name}: reference grads vs weights"
    );
    println!(
        "{name}: {checked} gradients, worst scaled max abs err {:.3e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn gradients_match_torch_tiny_odd_heads() {
    check_grads("tiny_odd_heads");
}

#[test]
fn gradients_match_torch_tiny_odd_width_noscale() {
    check_grads("tiny_odd_width_noscale");
}

#[test]
fn half_precision_runs_close_to_reference() {
    for name in FIXTURES {
        let (model, exp) = load(name, DType::BF16);
        for (what, got, want) in outputs(&model, &exp) {
            assert_eq!(got.dtype(), DType::BF16, "{name} {what}");
            // bf16 keeps ~3 significant digits; errors grow through the layers.
            let err = max_abs_err(&got, &want);
            let bound = 0.05 * max_abs(&want).max(1.0);
            println!("{name} {what} bf16: max abs err {err:.3e} (bound {bound:.3})");
            assert!(err <= bound, "{name} {what} bf16: {err} > {bound}");
        }
    }
    let (model, exp) = load("tiny_odd_heads", DType::F16);
    let feats = model.image_embeds(&exp["pixel_values"]).unwrap();
    assert_eq!(feats.dtype(), DType::F16);
    assert!(max_abs_err(&feats, &exp["image_embeds"]) < 0.1);
}

#[test]
fn integer_packed_weights_run_close_to_reference() {
    for name in FIXTURES {
        let (mut model, exp) = load(name, DType::F32);
        model.pack_for_inference(WeightFormat::I16).unwrap();
        for (what, got, want) in outputs(&model, &exp) {
            // 12-bit blocks keep ~4 significant digits, 10× finer than bf16's bound above.
            let err = max_abs_err(&got, &want);
            let bound = 5e-3 * max_abs(&want).max(1.0);
            println!("{name} {what} i16: max abs err {err:.3e} (bound {bound:.3})");
            assert!(err <= bound, "{name} {what} i16: {err} > {bound}");
        }
    }
}

#[test]
fn real_kosmos2_config_parses_with_hub_sizes() {
    let cfg = Kosmos2Config::from_file(fixture("kosmos-2-patch14-224.config.json")).unwrap();
    let (v, t) = (&cfg.vision_config, &cfg.text_config);
    assert_eq!(
        (
            v.hidden_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.intermediate_size
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!(
        (v.image_size, v.patch_size, v.num_positions()),
        (224, 14, 257)
    );
    assert_eq!(
        (
            t.embed_dim,
            t.layers,
            t.attention_heads,
            t.ffn_dim,
            t.vocab_size
        ),
        (2048, 24, 32, 8192, 65037)
    );
    assert_eq!(cfg.latent_query_num, 64);
    assert!((t.embed_scale() - 2048f64.sqrt()).abs() < 1e-12);
    // sum(p.numel() for p in Kosmos2ForConditionalGeneration(Kosmos2Config()).parameters())
    assert_eq!(cfg.num_parameters(), 1_664_485_376);
    assert!(
        cfg.unknown_fields().is_empty(),
        "{:?}",
        cfg.unknown_fields()
    );
}

// ---- bad inputs: clear errors, no panics ----

fn tensors_of(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu).unwrap()
}

fn load_err(cfg: &Kosmos2Config, file: &Path) -> String {
    match Kosmos2::load(cfg, &[file], DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", file.display()),
        Err(e @ Kosmos2Error::Weights { .. }) => e.to_string(),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

fn tiny_config() -> Kosmos2Config {
    Kosmos2Config::from_file(fixture("tiny_odd_heads").join("config.json")).unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let missing = "text_model.model.layers.1.ffn.ffn_layernorm.weight";
    let mut tensors = tensors_of("tiny_odd_heads");
    tensors.remove(missing).unwrap();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let msg = load_err(&tiny_config(), &file);
    assert!(msg.contains(missing), "{msg}");
    assert!(msg.contains(&file.display().to_string()), "{msg}");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let name = "image_to_text_projection.latent_query";
    let mut tensors = tensors_of("tiny_odd_heads");
    tensors.insert(
        name.into(),
        Tensor::zeros((6, 40), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let msg = load_err(&tiny_config(), &file);
    assert!(
        msg.contains("shape mismatch") && msg.contains(name),
        "{msg}"
    );

    // A config that disagrees with the checkpoint fails the same way.
    let mut cfg = tiny_config();
    cfg.text_config.ffn_dim += 1;
    let msg = load_err(&cfg, &fixture("tiny_odd_heads").join("model.safetensors"));
    assert!(
        msg.contains("shape mismatch") && msg.contains("ffn.fc1"),
        "{msg}"
    );
}

#[test]
fn truncated_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(fixture("tiny_odd_heads").join("model.safetensors")).unwrap();
    for keep in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..keep]).unwrap();
        let msg = load_err(&tiny_config(), &file);
        assert!(msg.contains(&file.display().to_string()), "{keep}: {msg}");
    }
}

fn config_error(json: &str) -> Kosmos2Error {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(&file, json).unwrap();
    let err = Kosmos2Config::from_file(&file).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    err
}

fn assert_field_error(json: &str, want_field: &str) {
    match config_error(json) {
        Kosmos2Error::ConfigField { field, message, .. } => {
            assert_eq!(field, want_field, "{message}")
        }
        e => panic!("expected a field error for {want_field}, got {e}"),
    }
}

#[test]
fn bad_config_fields_are_named() {
    assert_field_error(
        r#"{"text_config": {"attention_heads": "many"}}"#,
        "text_config.attention_heads",
    );
    assert_field_error(
        r#"{"vision_config": {"hidden_act": "swish2"}}"#,
        "vision_config.hidden_act",
    );
    assert_field_error(r#"{"latent_query_num": -3}"#, "latent_query_num");
    assert_field_error(
        r#"{"text_config": {"embed_dim": 40, "attention_heads": 3}}"#,
        "text_config.embed_dim",
    );
    assert_field_error(
        r#"{"vision_config": {"hidden_size": 24, "num_attention_heads": 5}}"#,
        "vision_config.hidden_size",
    );
    assert_field_error(r#"{"latent_query_num": 0}"#, "latent_query_num");
    assert_field_error(r#"{"model_type": "clip"}"#, "model_type");
    assert_field_error(r#"{"text_config": 5}"#, "text_config");
    assert!(matches!(
        config_error("{\"text_config\": {"),
        Kosmos2Error::ConfigJson { .. }
    ));
    let missing = Kosmos2Config::from_file("/nonexistent/config.json").unwrap_err();
    assert!(
        matches!(missing, Kosmos2Error::ReadConfig { .. }),
        "{missing}"
    );
}

#[test]
fn absent_keys_take_transformers_defaults_and_unknown_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    let json = r#"{"text_config": {"layers": 2, "my_new_knob": 1, "bad_words_ids": null},
                   "vision_config": null, "rope_theta": 3}"#;
    std::fs::write(&file, json).unwrap();
    let cfg = Kosmos2Config::from_file(&file).unwrap();
    assert_eq!(cfg.text_config.layers, 2);
    assert_eq!(cfg.text_config.embed_dim, 2048);
    assert_eq!(cfg.vision_config.hidden_size, 1024);
    assert_eq!(cfg.latent_query_num, 64);
    assert_eq!(
        cfg.unknown_fields(),
        ["rope_theta", "text_config.my_new_knob"]
    );
}

#[test]
fn wrong_input_shapes_are_errors() {
    let (model, exp) = load("tiny_odd_heads", DType::F32);
    let bad_pixels = Tensor::zeros((1, 3, 31, 31), DType::F32, &Device::Cpu).unwrap();
    let msg = model.vision_features(&bad_pixels).unwrap_err().to_string();
    assert!(msg.contains("pixel_values"), "{msg}");
    let flat = exp["pixel_values"].flatten_all().unwrap();
    assert!(model.image_embeds(&flat).is_err());
    let bad_embeds = Tensor::zeros((1, 4, 41), DType::F32, &Device::Cpu).unwrap();
    let msg = model
        .text_hidden_states(&bad_embeds)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("inputs_embeds"), "{msg}");
}

#[test]
fn pretrained_dir_loads_config_and_weights() {
    let model =
        Kosmos2::from_pretrained_dir(fixture("tiny_even"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().latent_query_num, 8);
    let exp = candle_core::safetensors::load(
        fixture("tiny_even").join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let got = model.image_embeds(&exp["pixel_values"]).unwrap();
    assert!(max_abs_err(&got, &exp["image_embeds"]) <= TOL);

    // Sharded folders go through the index; a shard it names must exist.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny_even").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = Kosmos2::from_pretrained_dir(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Kosmos2Error::NoWeights { .. }), "{err}");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"text_model.model.layer_norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = Kosmos2::from_pretrained_dir(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
}
