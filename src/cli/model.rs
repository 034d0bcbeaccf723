//! `mobile_vla model …` and `mobile_vla infer`: thin wrappers over `crate::model`.

use crate::data::image::ChannelOrder;
use crate::model::import::{import_robovlms, ConfigSource, ImportOptions};
use crate::model::model_dir::{model_info, POLICY_FILE};
use crate::model::{export, ActionChunk, LoadOptions, Policy, PolicyConfig, WeightFormat};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WeightDtype {
    /// f32, exact.
    F32,
    /// f32 weights packed as 12-bit integer blocks (x86-64 with AVX2): half the memory of f32
    /// and faster, within ~1e-3 of f32.
    I16,
    F16,
    Bf16,
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
    /// Compute dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Import(args) => import(args),
        ModelCommand::Info { dir } => info(&dir),
        ModelCommand::Export { dir, out } => {
            let n = export::export_robovlms(&dir, &out)?;
            println!("wrote {} ({n} tensors, RoboVLMs names)", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
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

#[derive(serde::Serialize)]
struct InferOutput {
    steps: Vec<ActionChunk>,
}

pub fn infer(args: InferArgs) -> anyhow::Result<ExitCode> {
    let (dtype, format) = match args.dtype {
        WeightDtype::F32 => (candle_core::DType::F32, WeightFormat::F32),
        WeightDtype::I16 => (candle_core::DType::F32, WeightFormat::I16),
        WeightDtype::F16 => (candle_core::DType::F16, WeightFormat::F32),
        WeightDtype::Bf16 => (candle_core::DType::BF16, WeightFormat::F32),
    };
    let opts = LoadOptions {
        dtype,
        device: candle_core::Device::Cpu,
        packing: Some(format),
    };
    let mut policy = Policy::load_with(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut steps = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let image = image::open(path)
            .with_context(|| format!("reading image {}", path.display()))?
            .to_rgb8();
        let started = std::time::Instant::now();
        steps.push(policy.step(&image, &args.instruction)?);
        tracing::info!(
            "{}: step in {:.0} ms",
            path.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    println!("{}", serde_json::to_string(&InferOutput { steps })?);
    Ok(ExitCode::SUCCESS)
}
