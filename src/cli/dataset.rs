//! `mobile_vla dataset …`: inspect, validate, recover, import and export episodes.

use crate::data::bag::{import_bag, ImportOptions};
use crate::data::dataset::ActionStats;
use crate::data::episode::{
    list_episodes, open_episodes, recover_partials, validate_file, Depth, EpisodeReader,
    ReadOptions, WriteOptions, PARTIAL_SUFFIX,
};
use crate::data::image::ChannelOrder;
use crate::data::mcap_export::export_mcap;
use crate::data::sampling::{period, seconds, SampleMode, SamplerConfig};
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Frames, duration, instruction, action ranges and channel order of episodes.
    Info(InfoArgs),
    /// Check every episode of a directory (or one file); exit 1 listing every defect.
    Validate(ValidateArgs),
    /// Salvage the partial files a crashed recorder left in a directory.
    Recover(RecoverArgs),
    /// Convert a rosbag2 recording (MCAP or sqlite3) into episodes.
    ImportBag(ImportBagArgs),
    /// Write episodes as one MCAP file (ros2 profile, CDR) that Foxglove and `ros2 bag play` open.
    ExportMcap(ExportMcapArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OrderArg {
    Bgr,
    Rgb,
}

impl From<OrderArg> for ChannelOrder {
    fn from(o: OrderArg) -> Self {
        match o {
            OrderArg::Bgr => ChannelOrder::Bgr,
            OrderArg::Rgb => ChannelOrder::Rgb,
        }
    }
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Channel order assumed for files without `image_channel_order` (the fork's files are BGR).
    #[arg(long, value_enum, default_value = "bgr")]
    pub default_channel_order: OrderArg,
}

impl ReadArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions {
            default_channel_order: self.default_channel_order.into(),
        }
    }
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// An episode file or a directory of them.
    pub path: PathBuf,
    /// Print JSON (one object per episode, plus totals).
    #[arg(long)]
    pub json: bool,
    /// With --json: include every action, event and a FNV-1a 64 hash of the stored image bytes.
    #[arg(long, requires = "json")]
    pub content: bool,
    /// Fail on the first invalid or corrupt episode instead of reporting and skipping it.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// A directory of episodes (or one file).
    pub path: PathBuf,
    /// Also decompress every frame (finds corrupt image chunks; slower).
    #[arg(long)]
    pub deep: bool,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportMcapArgs {
    /// An episode file or a directory of them (exported one after another).
    pub path: PathBuf,
    /// The MCAP file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
pub struct ImportBagArgs {
    /// rosbag2 directory (with metadata.yaml).
    pub bag_dir: PathBuf,
    /// Output directory for the episodes.
    #[arg(long)]
    pub out: PathBuf,
    /// sensor_msgs/Image or CompressedImage topic [default: the bag's only one].
    #[arg(long)]
    pub image_topic: Option<String>,
    /// geometry_msgs/Twist or TwistStamped topic [default: the bag's only one].
    #[arg(long)]
    pub cmd_topic: Option<String>,
    /// std_msgs/String topic carrying the instruction [default: the bag's only one, if any].
    #[arg(long)]
    pub instruction_topic: Option<String>,
    /// Instruction stored in every episode (overrides the topic).
    #[arg(long)]
    pub instruction: Option<String>,
    /// Start a new episode after this much time without a moving command (e.g. 2s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    pub split_on_idle: Option<Duration>,
    /// How frames are taken: one per command change (the fork's keyboard collector), or at
    /// --rate-hz (latest image + latest command); the same rule as recorder_node's `mode`.
    #[arg(long, value_enum, default_value = "event")]
    pub mode: SampleMode,
    /// Sampling rate for --mode rate.
    #[arg(long, default_value_t = 10.0)]
    pub rate_hz: f64,
    /// With --mode rate, a command older than this counts as zero (e.g. 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub cmd_timeout: Duration,
    /// In event mode, also add a stop_action frame when the command returns to zero.
    #[arg(long)]
    pub record_stops: bool,
    /// Channel order to store frames in.
    #[arg(long, value_enum, default_value = "bgr")]
    pub channel_order: OrderArg,
    /// gzip level 0-9 (h5py's default is 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub gzip_level: u8,
    /// Appended to episode names, e.g. `1box_hori_left` (the fork derives instructions from it).
    #[arg(long)]
    pub name_suffix: Option<String>,
}

/// `2s`, `1.5s`, `500ms`, `2` (seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("min") {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 2s, 500ms)"))?;
    seconds(&format!("`{s}`"), v * scale)
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Info(a) => info(a),
        DatasetCommand::Validate(a) => validate(a),
        DatasetCommand::Recover(a) => recover(a),
        DatasetCommand::ImportBag(a) => import(a),
        DatasetCommand::ExportMcap(a) => export(a),
    }
}

fn episode_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let files = list_episodes(path)?;
        if files.is_empty() {
            bail!("{}: no episode files (*.h5)", path.display());
        }
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        bail!("{}: no such file or directory", path.display())
    }
}

/// FNV-1a 64 of all stored frame bytes in order (cheap to recompute in Python for tests).
fn fnv1a(reader: &EpisodeReader) -> anyhow::Result<String> {
    let mut h: u64 = 0xcbf29ce484222325;
    for t in 0..reader.len() {
        for &b in reader.read_frame_stored(t)?.as_raw() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    Ok(format!("{h:016x}"))
}

fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let files = episode_files(&a.path)?;
    let opened = open_episodes(&files, a.read.options(), a.strict)?;
    let mut all = Vec::new();
    let (mut frames, mut duration) = (0usize, 0.0f64);
    let mut json = Vec::new();
    for r in &opened.episodes {
        let f = r.path();
        let m = r.meta();
        let stats = ActionStats::from_actions(r.actions());
        frames += r.len();
        duration += m.total_duration;
        all.extend_from_slice(r.actions());
        let instruction = r.instruction();
        let derived = m
            .stored_instruction
            .as_deref()
            .is_none_or(|s| s.trim().is_empty())
            && instruction.is_some();
        if a.json {
            let mut obj = serde_json::json!({
                "path": f,
                "episode_name": m.episode_name,
                "num_frames": m.num_frames,
                "total_duration": m.total_duration,
                "action_chunk_size": m.action_chunk_size,
                "frame_height": m.frame_size.0,
                "frame_width": m.frame_size.1,
                "channel_order": m.channel_order.as_str(),
                "channel_order_recorded": m.channel_order_recorded,
                "instruction": instruction,
                "instruction_derived": derived,
                "action_min": stats.map(|s| s.min),
                "action_max": stats.map(|s| s.max),
                "obstacle_layout_type": m.collection.obstacle_layout_type,
                "time_period": m.collection.time_period,
                "collection_datetime": m.collection.collection_datetime,
                "collection_hour": m.collection.collection_hour,
                "collection_minute": m.collection.collection_minute,
            });
            if a.content {
                obj["actions"] = serde_json::json!(r.actions());
                obj["events"] =
                    serde_json::json!(r.events().iter().map(|e| e.as_str()).collect::<Vec<_>>());
                obj["images_fnv1a64"] = serde_json::json!(fnv1a(r)?);
            }
            json.push(obj);
        } else {
            println!("{}", f.display());
            println!(
                "  frames {} ({}x{}), duration {:.2} s, chunk {}",
                m.num_frames, m.frame_size.1, m.frame_size.0, m.total_duration, m.action_chunk_size
            );
            let order_note = if m.channel_order_recorded {
                ""
            } else {
                " (attribute absent: default)"
            };
            println!("  channel order {}{order_note}", m.channel_order.as_str());
            match &instruction {
                Some(i) if derived => {
                    println!("  instruction \"{i}\" (derived from the file name)")
                }
                Some(i) => println!("  instruction \"{i}\""),
                None => println!("  instruction (none)"),
            }
            if let Some(s) = stats {
                println!(
                    "  actions min [{:.3}, {:.3}, {:.3}] max [{:.3}, {:.3}, {:.3}]  (linear_x, linear_y, angular_z)",
                    s.min[0], s.min[1], s.min[2], s.max[0], s.max[1], s.max[2]
                );
            }
        }
    }
    let total = ActionStats::from_actions(&all);
    let skipped: Vec<String> = opened.skipped.iter().map(|e| e.to_string()).collect();
    let n = opened.episodes.len();
    if a.json {
        let out = serde_json::json!({
            "episodes": json,
            "skipped": skipped,
            "total_episodes": n,
            "total_frames": frames,
            "total_duration": duration,
            "action_min": total.map(|s| s.min),
            "action_max": total.map(|s| s.max),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for s in &skipped {
            println!("SKIPPED {s}");
        }
        if files.len() > 1 {
            println!("{n} episodes, {frames} frames, {duration:.1} s");
            if let Some(s) = total {
                println!("  actions min {:?} max {:?}", s.min, s.max);
            }
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "warning: {} file(s) skipped (`mobile_vla dataset validate` lists their defects; --strict fails instead)",
            skipped.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let files = episode_files(&a.path)?;
    let depth = if a.deep {
        Depth::EveryFrame
    } else {
        Depth::Structure
    };
    let mut bad = 0;
    for f in &files {
        let defects = validate_file(f, depth);
        if defects.is_empty() {
            println!("ok      {}", f.display());
        } else {
            bad += 1;
            println!("INVALID {}", f.display());
            for d in &defects {
                println!("        {d}");
            }
        }
    }
    if a.path.is_dir() {
        let partials = std::fs::read_dir(&a.path)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(PARTIAL_SUFFIX))
            .count();
        if partials > 0 {
            println!(
                "note: {partials} unfinished partial file(s); `mobile_vla dataset recover {}`",
                a.path.display()
            );
        }
    }
    println!(
        "{} file(s): {} valid, {bad} invalid",
        files.len(),
        files.len() - bad
    );
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn recover(a: RecoverArgs) -> anyhow::Result<ExitCode> {
    let report = recover_partials(&a.dir)?;
    for (p, n) in &report.recovered {
        println!("recovered {} ({n} frames)", p.display());
    }
    for (p, why) in &report.discarded {
        println!("discarded {}: {why}", p.display());
    }
    for (p, why) in &report.kept {
        println!("KEPT      {}: {why}", p.display());
    }
    println!(
        "{} recovered, {} discarded, {} kept",
        report.recovered.len(),
        report.discarded.len(),
        report.kept.len()
    );
    Ok(if report.kept.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn export(a: ExportMcapArgs) -> anyhow::Result<ExitCode> {
    let episodes = episode_files(&a.path)?
        .iter()
        .map(|f| EpisodeReader::open_with(f, a.read.options()))
        .collect::<Result<Vec<_>, _>>()?;
    let s = export_mcap(&episodes, &a.out)?;
    println!(
        "wrote {}: {} episode(s), {} frames, {} messages (/image, /cmd_vel, /instruction, /action_event)",
        a.out.display(),
        s.episodes,
        s.frames,
        s.messages
    );
    Ok(ExitCode::SUCCESS)
}

fn import(a: ImportBagArgs) -> anyhow::Result<ExitCode> {
    let opts = ImportOptions {
        image_topic: a.image_topic,
        cmd_topic: a.cmd_topic,
        instruction_topic: a.instruction_topic,
        instruction: a.instruction,
        split_on_idle: a.split_on_idle,
        sampling: SamplerConfig {
            mode: a.mode,
            period: period("--rate-hz", a.rate_hz).map_err(anyhow::Error::msg)?,
            cmd_timeout: a.cmd_timeout,
            record_stops: a.record_stops,
        },
        write: WriteOptions::default()
            .channel_order(a.channel_order.into())
            .gzip_level(Some(a.gzip_level)),
        name_suffix: a.name_suffix,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} messages ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total.max(done));
        bar.set_position(done);
    };
    let summary = import_bag(&a.bag_dir, &a.out, &opts, &mut progress)
        .with_context(|| format!("importing {}", a.bag_dir.display()))?;
    bar.finish_and_clear();
    println!(
        "read {} image(s) from {} and {} command(s) from {}",
        summary.images, summary.image_topic, summary.commands, summary.cmd_topic
    );
    for (p, n, d) in &summary.episodes {
        println!("  {} : {n} frames, {d:.2} s", p.display());
    }
    if summary.frames_without_image > 0 {
        println!(
            "  {} frame(s) skipped: no image had arrived yet",
            summary.frames_without_image
        );
    }
    println!(
        "{} episode(s) written to {}",
        summary.episodes.len(),
        a.out.display()
    );
    if summary.episodes.is_empty() {
        eprintln!("warning: no moving command in the bag, so no episode");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
        // Fails before the fix: Duration::from_secs_f64 panicked on it.
        assert!(parse_duration("1e300").unwrap_err().contains("1e300"));
        assert!(parse_duration("1e300min").is_err());
    }
}
