//! The training loop end to end on generated episodes: `model init`, it learns (beats the
//! mean-action baseline on held-out episodes), `kill -9` then `--resume` equals the uninterrupted
//! run, `--progress json`, and bad input.

use image::RgbImage;
use mobile_vla::config::TrainConfig;
use mobile_vla::data::episode::{EpisodeWriter, EventType, WriteOptions};
use mobile_vla::data::image::ChannelOrder;
use mobile_vla::model::policy::Policy;
use mobile_vla::train::{Outcome, Progress, Strategy, TrainOptions, Trainer};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

const BIN: &str = env!("CARGO_BIN_EXE_mobile_vla");
const INSTRUCTIONS: [&str; 2] = ["go left around the box", "go right around the box"];

/// Held by each test: libhdf5 opens files without close-on-exec, so a `mobile_vla` process one test
/// spawns inherits (and keeps locked) episodes another test is reading or writing at that moment
/// (as in tests/corrupt_episodes.rs). Run in parallel, `it_learns` failed 4 runs in 5 on a quiet
/// machine with a different final loss; one at a time it passes.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures")
        .join(p)
}

/// The right action depends on both inputs: `vx` on the frame's colour (red → forward, blue →
/// backward), `wz` on the instruction (left → +, right → −).
fn target(red: bool, left: bool) -> [f32; 3] {
    [
        if red { 0.6 } else { -0.6 },
        0.0,
        if left { 0.6 } else { -0.6 },
    ]
}

fn frame(red: bool, rng: &mut rand::rngs::StdRng) -> RgbImage {
    RgbImage::from_fn(24, 24, |_, _| {
        let n = rng.random_range(0..40u8);
        if red {
            image::Rgb([200 + n / 2, n, n])
        } else {
            image::Rgb([n, n, 200 + n / 2])
        }
    })
}

/// `count` episodes of `len` frames, every (colour, instruction) combination in turn.
fn write_episodes(dir: &Path, count: usize, len: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for e in 0..count {
        let (red, left) = (e % 2 == 0, (e / 2) % 2 == 0);
        let opts = WriteOptions::default()
            .gzip_level(None)
            .channel_order(ChannelOrder::Rgb)
            .instruction(Some(INSTRUCTIONS[usize::from(!left)].into()));
        let mut w = EpisodeWriter::create(dir, &format!("ep{e:02}"), opts).unwrap();
        for t in 0..len {
            let ev = if t == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            w.push(&frame(red, &mut rng), target(red, left), ev)
                .unwrap();
        }
        w.finish(len as f64 * 0.4).unwrap();
    }
}

/// A tiny model directory via `mobile_vla model init` on the fixture HF Kosmos-2.
fn init_model(out: &Path) {
    let status = Command::new(BIN)
        .args(["model", "init", "--hf-model"])
        .arg(fixture("policy/hf_robovlms7"))
        .arg("--out")
        .arg(out)
        .args([
            "--window-size",
            "2",
            "--fwd-pred-next-n",
            "2",
            "--action-dim",
            "3",
        ])
        .args([
            "--hidden-size",
            "16",
            "--num-layers",
            "1",
            "--mlp-hidden",
            "32,32,16",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

const CONFIG: &str = "
seed: 7
batch_size: 4
learning_rate: 3.0e-3
min_lr_scale: 0.1
weight_decay: 0.0
warmup_steps: 2
scheduler: half-cosine
gradient_clip_val: 1.0
window_size: 2
val_fraction: 0.25
checkpoint_every_n_steps: 2
train_setup: {freeze_backbone: true, lora_enable: false}
trainer: {max_epochs: 30, max_steps: MAX_STEPS, accumulate_grad_batches: 2, precision: 16-mixed}
";

fn write_config(dir: &Path, max_steps: usize) -> PathBuf {
    let p = dir.join("train.yaml");
    std::fs::write(&p, CONFIG.replace("MAX_STEPS", &max_steps.to_string())).unwrap();
    p
}

#[test]
fn it_learns_image_and_instruction_dependent_actions() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (data, held_out, model) = (
        tmp.path().join("data"),
        tmp.path().join("held"),
        tmp.path().join("m"),
    );
    write_episodes(&data, 8, 6, 1);
    write_episodes(&held_out, 4, 6, 2);
    init_model(&model);
    let text = CONFIG
        .replace("MAX_STEPS", "80")
        .replace("learning_rate: 3.0e-3", "learning_rate: 1.0e-2");
    // Dropout off: on this 36-wide random backbone, 0.1 dropout noise swamps the [ACT] feature's
    // differences between inputs (with it on the run only learns one of the two factors).
    let cfg_path = model.join("config.json");
    let hf = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"dropout\": 0.1", "\"dropout\": 0.0")
        .replace("\"attention_dropout\": 0.1", "\"attention_dropout\": 0.0");
    std::fs::write(&cfg_path, hf).unwrap();
    let config = TrainConfig::from_value(&serde_yaml::from_str(&text).unwrap()).unwrap();
    let opts = TrainOptions {
        config,
        data,
        model,
        out: tmp.path().join("run"),
        resume: false,
        max_steps: None,
        strategy: Strategy::Config,
        budget: None,
    };
    let mut trainer = Trainer::new(opts).unwrap();
    assert!(
        trainer.table().contains("policy head"),
        "{}",
        trainer.table()
    );
    let outcome = trainer
        .run(&mut |_: &Progress| {}, &AtomicBool::new(false))
        .unwrap();
    let Outcome::Done {
        model_dir,
        final_loss,
        ..
    } = outcome
    else {
        panic!("not done: {outcome:?}")
    };
    // Normalised Huber loss per dim; the mean action scores 0.12 (0.6²/2 on two of three dims).
    assert!(final_loss < 0.02, "final training loss {final_loss}");

    // Held-out episodes, served as on the robot: per-step chunk 0 vs the recorded action.
    let mut policy = Policy::load(&model_dir).unwrap();
    let (mut err_model, mut err_mean, mut n) = (0f64, 0f64, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for e in 0..4 {
        let (red, left) = (e % 2 == 0, (e / 2) % 2 == 0);
        policy.reset();
        for _ in 0..4 {
            let chunk = policy
                .step(&frame(red, &mut rng), INSTRUCTIONS[usize::from(!left)])
                .unwrap();
            let want = target(red, left);
            // The training actions' mean is 0 in every dim (balanced combinations).
            for (got, want) in chunk.actions[0].iter().zip(want) {
                err_model += ((got - want) as f64).powi(2);
                err_mean += (want as f64).powi(2);
            }
            n += 1;
        }
    }
    let (mse, base) = (err_model / n as f64, err_mean / n as f64);
    eprintln!(
        "final loss {final_loss:.4}; held-out MSE {mse:.4} vs mean-action baseline {base:.4}"
    );
    assert!(
        mse * 10.0 < base,
        "held-out MSE {mse} vs mean-action baseline {base}: not 10× better"
    );
}

fn train_cmd(cfg: &Path, data: &Path, model: &Path, out: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .arg("--data")
        .arg(data)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--progress", "json"]);
    c
}

/// The metrics.jsonl step lines without wall-clock fields.
fn step_metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("event").is_none())
        .map(|mut v| {
            v.as_object_mut().unwrap().remove("samples_per_s");
            v
        })
        .collect()
}

/// The command exited 0; otherwise its stderr is the failure message.
fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temp dir with `count` generated episodes of `len` frames (`seed`) in `data` and a fresh model
/// directory `m`.
fn episodes_and_model(
    count: usize,
    len: usize,
    seed: u64,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model) = (tmp.path().join("data"), tmp.path().join("m"));
    write_episodes(&data, count, len, seed);
    init_model(&model);
    (tmp, data, model)
}

#[test]
fn kill_9_then_resume_equals_the_uninterrupted_run() {
    let _serial = serial();
    let (tmp, data, model) = episodes_and_model(4, 5, 5);
    let cfg = write_config(tmp.path(), 10);

    let full = tmp.path().join("full");
    let out = train_cmd(&cfg, &data, &model, &full).output().unwrap();
    assert_succeeded(&out);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout holds only JSON lines"))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["event"] == "progress" && l["phase"] == "training"));
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert!(Path::new(done["model_dir"].as_str().unwrap())
        .join("model.safetensors")
        .is_file());

    let killed = tmp.path().join("killed");
    let mut child = train_cmd(&cfg, &data, &model, &killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pointer = killed.join("checkpoint.json");
    let start = std::time::Instant::now();
    while !pointer.exists() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read(&pointer).unwrap();
    let ckpt = mobile_vla::train::state::latest(&killed).unwrap().unwrap();
    assert!(
        ckpt.join("state.json").is_file(),
        "checkpoint {} incomplete",
        ckpt.display()
    );
    assert!(
        !killed.join("model").exists() || step_metrics(&killed).len() == step_metrics(&full).len()
    );

    // Without --resume the run folder is refused, and the checkpoint is left as it was.
    let out = train_cmd(&cfg, &data, &model, &killed).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&pointer).unwrap(), before);

    let out = train_cmd(&cfg, &data, &model, &killed)
        .arg("--resume")
        .output()
        .unwrap();
    assert_succeeded(&out);
    assert_eq!(step_metrics(&killed), step_metrics(&full));
    let a = std::fs::read(full.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("model/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's"
    );
}

#[test]
fn bad_input_fails_with_the_culprit_named() {
    let _serial = serial();
    let (tmp, data, model) = episodes_and_model(2, 3, 9);
    let run = |cfg: &str, extra: &[&str]| {
        let p = tmp.path().join("c.yaml");
        std::fs::write(&p, cfg).unwrap();
        let out = train_cmd(&p, &data, &model, &tmp.path().join("run"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cfg}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let last: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
        assert_eq!(last["event"], "error", "{stdout}");
        last["message"].as_str().unwrap().to_owned()
    };
    let base = CONFIG.replace("MAX_STEPS", "2");
    let msg = run(&base.replace("window_size: 2", "window_size: 9"), &[]);
    assert!(msg.contains("window_size 9"), "{msg}");
    let msg = run(&base.replace("batch_size: 4", "batch_size: four"), &[]);
    assert!(msg.contains("`batch_size`"), "{msg}");
    let msg = run(&format!("{base}fwd_pred_next_n: 5\n"), &[]);
    assert!(
        msg.contains("fwd_pred_next_n") && msg.contains('5') && msg.contains('2'),
        "{msg}"
    );
    let msg = run(&base, &["--resume"]);
    assert!(msg.contains("no checkpoint"), "{msg}");
    // `--strategy auto` plans within `--budget`: nothing fits 1 MiB, and nothing is saved.
    let msg = run(&base, &["--strategy", "auto", "--budget", "1MiB"]);
    assert!(
        msg.contains("no training strategy fits") && msg.contains("head"),
        "{msg}"
    );
    assert!(!tmp.path().join("run/model").exists());
    // A foreign checkpoint: same run folder, another config.
    let out = train_cmd(
        &{
            let p = tmp.path().join("ok.yaml");
            std::fs::write(&p, &base).unwrap();
            p
        },
        &data,
        &model,
        &tmp.path().join("run"),
    )
    .output()
    .unwrap();
    assert_succeeded(&out);
    let msg = run(
        &base.replace("learning_rate: 3.0e-3", "learning_rate: 1.0e-3"),
        &["--resume"],
    );
    assert!(
        msg.contains("another run") && msg.contains("config"),
        "{msg}"
    );
    let out = Command::new(BIN)
        .args(["train", "--strategy", "bogus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// SEED 6.2 through the CLI: `--strategy lora` trains peft-style adapters on every backbone
/// linear (the table counts them), the run's model directory holds them merged into the base
/// weights (no adapter tensors, changed projections, frozen biases untouched), and `infer` serves it.
#[test]
fn lora_strategy_trains_merges_and_serves() {
    let _serial = serial();
    let (tmp, data, model) = episodes_and_model(4, 5, 11);
    let text = CONFIG.replace("MAX_STEPS", "3").replace(
        "lora_enable: false",
        "lora_enable: true, lora_r: 4, lora_alpha: 8, lora_dropout: 0.1, lora_bias: none",
    );
    let cfg = tmp.path().join("lora.yaml");
    std::fs::write(&cfg, &text).unwrap();

    // The table: adapters r × (in + out) per linear of both towers and the projection.
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let (t, v) = (&hf["text_config"], &hf["vision_config"]);
    let n = |x: &serde_json::Value, k: &str| x[k].as_u64().unwrap();
    let (d, f, dv, fv) = (
        n(t, "embed_dim"),
        n(t, "ffn_dim"),
        n(v, "hidden_size"),
        n(v, "intermediate_size"),
    );
    let per_layer = |d, f| 4 * 2 * d + 2 * (d + f);
    let adapters = 4
        * (n(t, "layers") * per_layer(d, f)
            + n(v, "num_hidden_layers") * per_layer(dv, fv)
            + (dv + d)
            + 4 * 2 * d);
    let trainer = Trainer::new(TrainOptions {
        config: TrainConfig::from_value(&serde_yaml::from_str(&text).unwrap()).unwrap(),
        data: data.clone(),
        model: model.clone(),
        out: tmp.path().join("unused"),
        resume: false,
        max_steps: None,
        strategy: Strategy::Lora,
        budget: None,
    })
    .unwrap();
    let row = trainer
        .table()
        .lines()
        .find(|l| l.starts_with("LoRA adapters"))
        .unwrap()
        .to_owned();
    assert!(
        row.contains("yes") && row.ends_with(&format!(" {adapters}")),
        "{row} (want {adapters})\n{}",
        trainer.table()
    );
    assert!(trainer.table().contains("vision tower"));

    let run = tmp.path().join("run");
    let out = train_cmd(&cfg, &data, &model, &run)
        .args(["--strategy", "lora"])
        .output()
        .unwrap();
    assert_succeeded(&out);
    let start: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(start["strategy"], "lora", "{start}");
    assert_eq!(start["lora"]["r"], 4, "{start}");

    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let before = load(&model.join("model.safetensors"));
    let after = load(&run.join("model/model.safetensors"));
    let mut names: Vec<_> = after.keys().cloned().collect();
    names.sort();
    let mut want: Vec<_> = before.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want, "merged directory has exactly the base tensors");
    let moved = |name: &str| {
        let diff = (&after[name] - &before[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff > 0.0
    };
    assert!(moved("text_model.model.layers.0.self_attn.q_proj.weight"));
    assert!(moved("vision_model.model.encoder.layers.0.mlp.fc1.weight"));
    assert!(!moved("text_model.model.layers.0.self_attn.q_proj.bias"));
    assert!(!moved("text_model.model.embed_tokens.weight"));

    let frame_path = tmp.path().join("f.png");
    frame(true, &mut rand::rngs::StdRng::seed_from_u64(1))
        .save(&frame_path)
        .unwrap();
    let out = Command::new(BIN)
        .args(["infer", "--model"])
        .arg(run.join("model"))
        .args(["--instruction", INSTRUCTIONS[0], "--image"])
        .arg(&frame_path)
        .output()
        .unwrap();
    assert_succeeded(&out);
    let served: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(served.to_string().contains("actions"), "{served}");

    // The way out to RoboVLMs: the same run as a RoboVLMs JSON config, read back by our reader.
    let printed = train_cmd(&cfg, &data, &model, &tmp.path().join("unused"))
        .args(["--strategy", "lora", "--print-robovlms-config"])
        .output()
        .unwrap();
    assert!(printed.status.success());
    let json: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    let back = TrainConfig::from_value(&json).unwrap();
    let mine = TrainConfig::from_value(&serde_yaml::from_str(&text).unwrap()).unwrap();
    assert_eq!(back.train_setup, Strategy::Lora.setup(&mine.train_setup));
    assert_eq!(
        (
            back.window_size,
            back.model.fwd_pred_next_n,
            back.model.action_dim
        ),
        (Some(2), Some(2), Some(3))
    );
    assert_eq!(
        json["gradient_clip_val"],
        json["trainer"]["gradient_clip_val"]
    );
    let auto = train_cmd(&cfg, &data, &model, &tmp.path().join("unused"))
        .args(["--strategy", "auto", "--print-robovlms-config"])
        .output()
        .unwrap();
    assert!(!auto.status.success());
}
