//! `mobile_vla model …` and `mobile_vla infer`: thin wrappers over `crate::model`.

use crate::data::image::ChannelOrder;
use crate::model::import::{import_robovlms, ConfigSource, ImportOptions};
use crate::model::model_dir::{model_info, POLICY_FILE};
use crate::model::{
    export, ActionChunk, LoadOptions, LstmSpec, Policy, PolicyConfig, WeightFormat,
};
use crate::train::init::{init_model_dir, InitOptions};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Make a model directory from a Hugging Face Kosmos-2 folder with a fresh action token and head.
    Init(InitArgs),
    /// Import a RoboVLMs / Mobile VLA PyTorch Lightning checkpoint into a model directory.
    Import(ImportArgs),
    /// Parameters per component, dtypes and memory of a model directory.
    Info {
        /// Model directory (config.json, policy.json, model.safetensors, tokenizer.json).
        dir: PathBuf,
    },
    /// Write a model directory's weights as safetensors with RoboVLMs checkpoint names.
    Export {
        dir: PathBuf,
        /// Output `.safetensors` file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Hugging Face Kosmos-2 folder (config.json, tokenizer.json, model.safetensors or shards).
    #[arg(long)]
    pub hf_model: PathBuf,
    /// New model directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Frames of history (the fork's 16; a training setting the config may change).
    #[arg(long, default_value_t = 16)]
    pub window_size: usize,
    /// Future actions predicted per frame (the fork's 2).
    #[arg(long, default_value_t = 2)]
    pub fwd_pred_next_n: usize,
    /// 3: [vx, vy, wz]; 4: + gripper; 7: the fork's [x, y, 0, 0, 0, rz, gripper].
    #[arg(long, default_value_t = 3)]
    pub action_dim: usize,
    /// LSTM width (RoboVLMs: 1024).
    #[arg(long, default_value_t = 1024)]
    pub hidden_size: usize,
    /// LSTM layers (RoboVLMs: 4).
    #[arg(long, default_value_t = 4)]
    pub num_layers: usize,
    /// Hidden widths of the action MLP (RoboVLMs: 1024,512,256).
    #[arg(long, value_delimiter = ',', default_values_t = [1024, 512, 256])]
    pub mlp_hidden: Vec<usize>,
    /// Actions are normalised from [-norm, norm] (RoboVLMs norm_min/norm_max).
    #[arg(long, default_value_t = 1.0)]
    pub norm: f32,
    /// Seconds each chunk step spans on the robot.
    #[arg(long, default_value_t = 0.4)]
    pub dt: f32,
    /// Seed of the head's initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The `.ckpt` / `.pt` file (zip of pickles, `state_dict` inside or at the top).
    pub ckpt: PathBuf,
    /// Hugging Face Kosmos-2 folder: config.json + tokenizer.json (+ model.safetensors for backbone
    /// tensors the checkpoint lacks).
    #[arg(long)]
    pub hf_model: PathBuf,
    /// New model directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// RoboVLMs JSON config; default: the checkpoint's `hyper_parameters.configs`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint-layout indices of vx,vy,wz (default by action_dim: 7 → 0,1,5; 4 → 0,1,2).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    pub robot_dims: Option<Vec<usize>>,
    /// Seconds each chunk step spans on the robot.
    #[arg(long, default_value_t = 0.4)]
    pub dt: f32,
    /// Channel order the checkpoint was trained on (`bgr` for Mobile VLA fork checkpoints trained on
    /// stored camera frames fed unconverted).
    #[arg(long, default_value = "rgb")]
    pub model_channel_order: ChannelOrder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    /// f32 weights in the packed f32 GEMM (x86-64 with AVX2; candle's matmul elsewhere).
    F32,
    /// f32 weights packed as 12-bit integer blocks (x86-64 with AVX2): half the memory of f32
    /// and faster, within ~1e-3 of f32.
    I16,
    /// Weights and activations in f16 through candle's matmul (no packed GEMM): half the memory
    /// of f32, several times slower on CPUs without native f16 arithmetic.
    F16,
    /// As `f16`, in bf16 (~1e-2 from f32).
    Bf16,
}

impl WeightDtype {
    /// How the policy is loaded for inference with this choice.
    pub fn load_options(self) -> LoadOptions {
        let (dtype, packing) = match self {
            Self::F32 => (candle_core::DType::F32, Some(WeightFormat::F32)),
            Self::I16 => (candle_core::DType::F32, Some(WeightFormat::I16)),
            // The packed GEMM holds f32 or i16 panels only; half precision stays in candle.
            Self::F16 => (candle_core::DType::F16, None),
            Self::Bf16 => (candle_core::DType::BF16, None),
        };
        LoadOptions {
            dtype,
            device: candle_core::Device::Cpu,
            packing,
        }
    }
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The language instruction.
    #[arg(long)]
    pub instruction: String,
    /// Frames in order (PNG/JPEG, true RGB); each is one policy step with history carried.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Weight format and compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Init(args) => init(args),
        ModelCommand::Import(args) => import(args),
        ModelCommand::Info { dir } => info(&dir),
        ModelCommand::Export { dir, out } => {
            let n = export::export_robovlms(&dir, &out)?;
            println!("wrote {} ({n} tensors, RoboVLMs names)", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let mlp_hidden = match args.mlp_hidden.as_slice() {
        &[a, b, c] => [a, b, c],
        other => anyhow::bail!("--mlp-hidden needs 3 widths, got {other:?}"),
    };
    let opts = InitOptions {
        window_size: args.window_size,
        fwd_pred_next_n: args.fwd_pred_next_n,
        action_dim: args.action_dim,
        head: LstmSpec {
            hidden_size: args.hidden_size,
            num_layers: args.num_layers,
            mlp_hidden,
        },
        norm: args.norm,
        dt: args.dt,
        seed: args.seed,
    };
    let cfg = init_model_dir(&args.hf_model, &args.out, &opts)
        .with_context(|| format!("initialising {}", args.out.display()))?;
    println!(
        "new model directory {} (backbone {})",
        args.out.display(),
        args.hf_model.display()
    );
    print_policy(&cfg);
    Ok(ExitCode::SUCCESS)
}

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let robot_indices = match args.robot_dims.as_deref() {
        Some(&[x, y, z]) => Some([x, y, z]),
        Some(other) => anyhow::bail!("--robot-dims needs 3 indices, got {other:?}"),
        None => None,
    };
    let opts = ImportOptions {
        config: args.config,
        robot_indices,
        dt: args.dt,
        model_channel_order: args.model_channel_order,
    };
    let report = import_robovlms(&args.ckpt, &args.hf_model, &args.out, &opts)
        .with_context(|| format!("importing {}", args.ckpt.display()))?;
    let source = match &report.config_source {
        ConfigSource::File(p) => p.display().to_string(),
        ConfigSource::CheckpointHyperParameters => "checkpoint hyper_parameters.configs".into(),
    };
    println!("imported {} → {}", args.ckpt.display(), args.out.display());
    println!("  config: {source}");
    print_policy(&report.policy);
    println!("  tensors from checkpoint: {}", report.from_checkpoint);
    println!(
        "  backbone tensors from {}: {}",
        args.hf_model.display(),
        report.from_hf.len()
    );
    for (what, names) in [
        ("checkpoint keys ignored (no mapping)", &report.unmatched),
        ("tensors dropped (not used by the model)", &report.unused),
    ] {
        println!("  {what}: {}", names.len());
        for n in names {
            println!("    {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_policy(p: &PolicyConfig) {
    let a = &p.action;
    println!(
        "  window {} · chunk {} · LSTM {}×{} · action dim {}{} · robot dims {:?} · norm {} · input {} · dt {} s",
        p.window_size,
        p.fwd_pred_next_n,
        p.head.hidden_size,
        p.head.num_layers,
        a.dim,
        if a.gripper { " (gripper last)" } else { "" },
        a.robot_indices,
        a.norm.map_or("none".into(), |n| format!("[{}, {}]", n.min, n.max)),
        p.model_channel_order,
        p.dt
    );
}

fn info(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let components = model_info(dir)?;
    let policy = PolicyConfig::from_file(&dir.join(POLICY_FILE))?;
    println!("{}", dir.display());
    print_policy(&policy);
    println!(
        "  {:<14} {:>14} {:>12}  dtype",
        "component", "params", "MiB on disk"
    );
    let (mut params, mut bytes) = (0, 0);
    for (name, c) in &components {
        let dtypes: Vec<&str> = c.dtypes.iter().map(String::as_str).collect();
        println!(
            "  {:<14} {:>14} {:>12.1}  {}",
            name,
            c.params,
            c.bytes as f64 / 1048576.0,
            dtypes.join(",")
        );
        params += c.params;
        bytes += c.bytes;
    }
    println!(
        "  {:<14} {:>14} {:>12.1}",
        "total",
        params,
        bytes as f64 / 1048576.0
    );
    let gib = |b: usize| b as f64 / 1073741824.0;
    println!(
        "  weights in memory: {:.2} GiB as f32, {:.2} GiB as bf16/f16",
        gib(params * 4),
        gib(params * 2)
    );
    Ok(ExitCode::SUCCESS)
}

/// An image file that cannot be read. Holds the image crate's message, not its error: that error
/// repeats its own cause as its `source()`, so a chain printer showed it twice
/// (`Invalid PNG signature.: Invalid PNG signature.`).
#[derive(Debug, thiserror::Error)]
#[error("cannot read image {path}: {msg}")]
pub struct FrameError {
    path: PathBuf,
    msg: String,
}

/// Reads a frame file as true RGB.
fn read_frame(path: &std::path::Path) -> Result<image::RgbImage, FrameError> {
    image::open(path)
        .map(|i| i.to_rgb8())
        .map_err(|e| FrameError {
            path: path.to_owned(),
            msg: e.to_string(),
        })
}

#[derive(serde::Serialize)]
struct InferOutput {
    steps: Vec<ActionChunk>,
    /// Wall time of each step (the image already decoded) [ms].
    step_ms: Vec<f64>,
}

pub fn infer(args: InferArgs) -> anyhow::Result<ExitCode> {
    let mut policy = Policy::load_with(&args.model, &args.dtype.load_options())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut steps = Vec::with_capacity(args.images.len());
    let mut step_ms = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let image = read_frame(path)?;
        let started = std::time::Instant::now();
        steps.push(policy.step(&image, &args.instruction)?);
        step_ms.push(started.elapsed().as_secs_f64() * 1e3);
        tracing::info!(
            "{}: step in {:.0} ms",
            path.display(),
            step_ms[step_ms.len() - 1]
        );
    }
    println!(
        "{}",
        serde_json::to_string(&InferOutput { steps, step_ms })?
    );
    Ok(ExitCode::SUCCESS)
}
