//! `make bench`: latency of one policy step (a new frame through Kosmos-2 → `[ACT]` feature → LSTM
//! head over the full window → de-normalised chunk) for three model shapes, candle vs PyTorch eager.
//!
//! Every case runs in its own process so that its peak RSS (`VmHWM`) is its own: the parent spawns
//! `policy_step --case <shape> <dtype>` per candle case and `benches/torch_policy_step.py` per shape,
//! each printing one JSON line, then prints the table. Weights are random (generated in-process; the
//! full shape needs no download). Environment:
//! - `MOBILE_VLA_BENCH_FULL=0` skips the full Kosmos-2 shape (it takes minutes and ~7 GB per f32 copy);
//! - `MOBILE_VLA_BENCH_DTYPES` (default `f32,i16,bf16,f16`), `MOBILE_VLA_BENCH_SHAPES` (default all);
//! - `MOBILE_VLA_TORCH_PYTHON`: the interpreter with torch + transformers (default the repo's
//!   `.cache/torch-venv`); without one the torch column is left empty;
//! - `RAYON_NUM_THREADS` (default 2) sets the threads of both frameworks' matmuls;
//!   `CANDLE_NUM_THREADS` (default 1 here) those of candle's element-wise ops.

mod child;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use mobile_vla::model::head::History;
use mobile_vla::model::kosmos2::Kosmos2Config;
use mobile_vla::model::tokenizer::PromptTokenizer;
use mobile_vla::model::WeightFormat;
use mobile_vla::model::{LstmSpec, Policy, PolicyConfig};
use serde::{Deserialize, Serialize};

/// Mobile VLA fork's window; prompt `<s> + 14 words + </s>` (RoboVLMs' prompt with a short instruction).
const WINDOW: usize = 16;
const FWD_PRED_NEXT_N: usize = 2;
const PROMPT_WORDS: usize = 14;

struct ShapeSpec {
    name: &'static str,
    config: &'static str,
    head: LstmSpec,
    /// Timed steps (after one warm-up step).
    steps: usize,
}

fn shapes() -> Vec<ShapeSpec> {
    vec![
        ShapeSpec {
            name: "tiny",
            config: "test/fixtures/kosmos2/tiny_even/config.json",
            head: LstmSpec {
                hidden_size: 12,
                num_layers: 2,
                mlp_hidden: [20, 16, 12],
            },
            steps: 30,
        },
        ShapeSpec {
            name: "small",
            config: "benches/kosmos2-small.config.json",
            head: LstmSpec::default(),
            steps: 10,
        },
        ShapeSpec {
            name: "full",
            config: "test/fixtures/kosmos2/kosmos-2-patch14-224.config.json",
            head: LstmSpec::default(),
            steps: 3,
        },
    ]
}

/// One case's figures, as printed by the child processes (the torch script prints the same keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaseResult {
    framework: String,
    shape: String,
    dtype: String,
    params: usize,
    weights_bytes: usize,
    build_s: f64,
    median_s: f64,
    min_s: f64,
    steps: usize,
    peak_rss_bytes: usize,
    threads: usize,
    /// Median seconds of the parts, timed separately after the steps: vision tower, vision tower +
    /// projection, whole VLM (→ `[ACT]` feature), LSTM head over the window.
    #[serde(default)]
    parts_s: HashMap<String, f64>,
}

/// Random weights, created directly in the requested dtype (no f32 copy of the whole model).
/// 1-D `*.weight` tensors are layer-norm gains and get 1; everything else ~U(±0.035) (std 0.02).
#[derive(Default, Clone)]
struct RandomWeights {
    elems: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        self.elems.fetch_add(n, Ordering::Relaxed);
        self.bytes
            .fetch_add(n * dtype.size_in_bytes(), Ordering::Relaxed);
        if s.rank() == 1 && name.ends_with(".weight") {
            return Tensor::ones(s, dtype, dev);
        }
        // xorshift64*, seeded by the name: deterministic and fast enough for 1.7 B values.
        let mut state = name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
        }) | 1;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 0.07
        };
        match dtype {
            DType::F32 => Tensor::from_vec((0..n).map(|_| next()).collect::<Vec<_>>(), s, dev),
            DType::BF16 => Tensor::from_vec(
                (0..n)
                    .map(|_| half::bf16::from_f32(next()))
                    .collect::<Vec<_>>(),
                s,
                dev,
            ),
            DType::F16 => Tensor::from_vec(
                (0..n)
                    .map(|_| half::f16::from_f32(next()))
                    .collect::<Vec<_>>(),
                s,
                dev,
            ),
            other => candle_core::bail!("no random weights for {other:?}"),
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn peak_rss_bytes() -> Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?;
    Ok(kb * 1024)
}

/// Weight dtype and packing of a case: `f32`, `i16` (f32 weights packed as 12-bit integer blocks,
/// as `Policy::load` with `WeightFormat::I16`), `bf16`, `f16`.
fn parse_dtype(s: &str) -> Result<(DType, WeightFormat)> {
    Ok(match s {
        "f32" => (DType::F32, WeightFormat::F32),
        "i16" => (DType::F32, WeightFormat::I16),
        "bf16" => (DType::BF16, WeightFormat::F32),
        "f16" => (DType::F16, WeightFormat::F32),
        other => bail!("unknown dtype {other:?} (f32, i16, bf16, f16)"),
    })
}

/// Token ids `<s> w… </s>` valid for any vocabulary of ≥ 4 entries.
fn prompt_ids(vocab: usize) -> Vec<u32> {
    let words = (0..PROMPT_WORDS).map(|i| (3 + (i * 7) % (vocab - 3)) as u32);
    std::iter::once(0).chain(words).chain([2]).collect()
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

fn run_case(root: &Path, spec: &ShapeSpec, dtype_name: &str) -> Result<CaseResult> {
    let (dtype, format) = parse_dtype(dtype_name)?;
    let dev = Device::Cpu;
    let backbone_cfg = Kosmos2Config::from_file(root.join(spec.config))?;
    let mut cfg = PolicyConfig::native(WINDOW, FWD_PRED_NEXT_N, 1.15, 0.4);
    cfg.head = spec.head;
    // Only needed to build the policy: the bench passes token ids directly.
    let tokenizer =
        PromptTokenizer::from_file(&root.join("test/fixtures/policy/native/tokenizer.json"))?;
    let weights = RandomWeights::default();
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(weights.clone()), dtype, dev.clone());
    let mut policy = Policy::new(cfg, &backbone_cfg, tokenizer, vb)?;
    // As `Policy::load` does for inference.
    policy.pack_for_inference(format)?;
    let build_s = t0.elapsed().as_secs_f64();

    let ids = prompt_ids(backbone_cfg.text_config.vocab_size);
    let s = policy.image_size();
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, s, s), &dev)?;
    // A full window of history, so every timed step re-runs the LSTM over `WINDOW` features.
    let mut history = History::default();
    let d = backbone_cfg.text_config.embed_dim;
    for _ in 0..WINDOW {
        let f = Tensor::randn(0f32, 1.0, (1, d), &dev)?.to_dtype(dtype)?;
        policy.head().step(&mut history, &f)?;
    }
    let mut step = || -> Result<f64> {
        let t = Instant::now();
        let feature = policy.frame_features(&pixels, &ids)?;
        let out = policy.head().step(&mut history, &feature)?;
        let chunk = policy.decode(&out)?;
        std::hint::black_box(chunk);
        Ok(t.elapsed().as_secs_f64())
    };
    step()?; // warm-up
    let mut times = (0..spec.steps)
        .map(|_| step())
        .collect::<Result<Vec<_>>>()?;
    let min_s = times.iter().copied().fold(f64::INFINITY, f64::min);
    let feature = policy.frame_features(&pixels, &ids)?;
    // Reading one number back waits for the whole computation.
    let sync = |t: Tensor| -> Result<()> {
        t.to_dtype(DType::F32)?.sum_all()?.to_vec0::<f32>()?;
        Ok(())
    };
    let backbone = policy.backbone();
    let parts: [(&str, &dyn Fn() -> Result<()>); 4] = [
        ("vision", &|| sync(backbone.vision_features(&pixels)?)),
        ("image_embeds", &|| sync(backbone.image_embeds(&pixels)?)),
        ("vlm", &|| sync(policy.frame_features(&pixels, &ids)?)),
        ("head", &|| {
            let out = policy.head().step(&mut history.clone(), &feature)?;
            policy.decode(&out)?;
            Ok(())
        }),
    ];
    let mut parts_s = HashMap::new();
    for (name, f) in parts {
        let mut ts = (0..spec.steps.div_ceil(3))
            .map(|_| {
                let t = Instant::now();
                f().map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<_>>>()?;
        parts_s.insert(name.to_string(), median(&mut ts));
    }
    Ok(CaseResult {
        framework: "candle".into(),
        shape: spec.name.into(),
        dtype: dtype_name.into(),
        params: weights.elems.load(Ordering::Relaxed),
        weights_bytes: weights.bytes.load(Ordering::Relaxed),
        build_s,
        median_s: median(&mut times),
        min_s,
        steps: spec.steps,
        peak_rss_bytes: peak_rss_bytes()?,
        threads: candle_core::utils::get_num_threads(),
        parts_s,
    })
}

/// Runs a case's child process (one JSON result line).
fn run_child(cmd: Command, what: &str) -> Result<CaseResult> {
    eprintln!("[bench] {what} …");
    let r: CaseResult = serde_json::from_value(child::run_json_child(cmd, what)?)?;
    eprintln!(
        "[bench] {what}: median {:.4} s, min {:.4} s, peak RSS {:.2} GB",
        r.median_s,
        r.min_s,
        gb(r.peak_rss_bytes)
    );
    Ok(r)
}

fn gb(bytes: usize) -> f64 {
    bytes as f64 / 1e9
}

fn torch_python(root: &Path) -> Option<PathBuf> {
    let p = std::env::var_os("MOBILE_VLA_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/torch-venv/bin/python"));
    p.exists().then_some(p)
}

fn print_table(results: &[CaseResult]) {
    let torch: HashMap<&str, &CaseResult> = results
        .iter()
        .filter(|r| r.framework == "torch" && r.dtype == "f32")
        .map(|r| (r.shape.as_str(), r))
        .collect();
    println!();
    println!(
        "| shape | framework | dtype | params | weights GB | median s | min s | peak RSS GB | torch f32 / this | vision / VLM / head s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let ratio = torch.get(r.shape.as_str()).map_or("–".to_string(), |t| {
            format!("{:.2}×", t.median_s / r.median_s)
        });
        let part = |k: &str| {
            r.parts_s
                .get(k)
                .map_or("–".to_string(), |s| format!("{s:.3}"))
        };
        println!(
            "| {} | {} | {} | {:.1} M | {:.2} | {:.4} | {:.4} | {:.2} | {} | {} / {} / {} |",
            r.shape,
            r.framework,
            r.dtype,
            r.params as f64 / 1e6,
            gb(r.weights_bytes),
            r.median_s,
            r.min_s,
            gb(r.peak_rss_bytes),
            ratio,
            part("vision"),
            part("vlm"),
            part("head")
        );
    }
    println!(
        "\nthreads: {}; step = VLM on one new frame (1×3×224×224 pixels → [ACT] feature) + LSTM over a \
         window of {WINDOW} + de-normalised chunk; ratio > 1 means faster than PyTorch eager f32.",
        results.first().map_or(0, |r| r.threads)
    );
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    child::default_threads();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let (shape, dtype) = match (args.get(i + 1), args.get(i + 2)) {
            (Some(s), Some(d)) => (s, d),
            _ => bail!("usage: policy_step --case <shape> <dtype>"),
        };
        let spec = shapes()
            .into_iter()
            .find(|s| s.name == shape)
            .with_context(|| format!("unknown shape {shape:?}"))?;
        let r = run_case(&root, &spec, dtype)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }

    let full = std::env::var("MOBILE_VLA_BENCH_FULL").map_or(true, |v| v != "0");
    let dtypes =
        std::env::var("MOBILE_VLA_BENCH_DTYPES").unwrap_or_else(|_| "f32,i16,bf16,f16".into());
    let only = std::env::var("MOBILE_VLA_BENCH_SHAPES").ok();
    let python = torch_python(&root);
    if python.is_none() {
        eprintln!("[bench] no torch interpreter (set MOBILE_VLA_TORCH_PYTHON or run `make bench`): torch column skipped");
    }
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for spec in shapes() {
        if (spec.name == "full" && !full)
            || only
                .as_ref()
                .is_some_and(|o| !o.split(',').any(|s| s == spec.name))
        {
            continue;
        }
        for dtype in dtypes.split(',').filter(|d| !d.is_empty()) {
            let mut cmd = Command::new(&exe);
            cmd.args(["--case", spec.name, dtype]);
            results.push(run_child(cmd, &format!("candle {} {dtype}", spec.name))?);
        }
        if let Some(py) = &python {
            let mut cmd = Command::new(py);
            cmd.arg(root.join("benches/torch_policy_step.py"))
                .args(["--shape", spec.name, "--config"])
                .arg(root.join(spec.config))
                .args([
                    "--steps",
                    &spec.steps.to_string(),
                    "--window",
                    &WINDOW.to_string(),
                    "--fwd-pred-next-n",
                    &FWD_PRED_NEXT_N.to_string(),
                    "--prompt-words",
                    &PROMPT_WORDS.to_string(),
                    "--lstm-hidden",
                    &spec.head.hidden_size.to_string(),
                    "--lstm-layers",
                    &spec.head.num_layers.to_string(),
                    "--threads",
                    &candle_core::utils::get_num_threads().to_string(),
                    "--mlp-hidden",
                ])
                .args(spec.head.mlp_hidden.map(|w| w.to_string()));
            results.push(run_child(cmd, &format!("torch {} f32", spec.name))?);
        }
    }
    print_table(&results);
    Ok(())
}
