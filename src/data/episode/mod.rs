//! Mobile VLA episodes: one HDF5 file per demonstration, `<episode_name>.h5`, in exactly the
//! layout the fork's collector writes and its loaders read (see `shared/REFERENCE.md`, "Dataset
//! format"):
//!
//! | object | kind | content |
//! | --- | --- | --- |
//! | `episode_name` | attr, str | file stem |
//! | `total_duration` | attr, f64 | seconds |
//! | `num_frames` | attr, int | T |
//! | `action_chunk_size` | attr, int | 8 in the fork |
//! | `obstacle_layout_type`, `time_period`, `collection_datetime` | attrs, str, optional | newer files |
//! | `collection_hour`, `collection_minute` | attrs, int, optional | newer files |
//! | `image_channel_order` | attr, str (`bgr`/`rgb`) | ours; files without it are read as [`DEFAULT_CHANNEL_ORDER`] |
//! | `images` | gzip dataset, uint8 (T, H, W, 3) | camera frames |
//! | `actions` | gzip dataset, float32 (T, 3) | `[linear_x, linear_y, angular_z]` |
//! | `action_event_types` | gzip dataset, vlen UTF-8 (T,) | `episode_start`/`start_action`/`stop_action` |
//! | `language_instruction` | dataset, fixed string S256 (1,), optional | else derived from the file name |
//!
//! HDF5 crate: `hdf5-metno` (imported as `hdf5`). It is the maintained fork of `hdf5-rust` (the
//! original is unmaintained since 2021), builds against the system libhdf5 1.10 – 1.14 that Debian
//! and Ubuntu ship (so no bundled C build), and supports what this format needs: variable-length
//! UTF-8 strings, fixed-length strings, chunked resizable datasets and the deflate (gzip) filter.
//! A pure-Rust reader (e.g. `hdf5-reader`-style crates) cannot write, and netCDF wrappers add a
//! layer we do not need.

mod compress;
mod format;
mod isolate;
mod reader;
mod salvage;
mod writer;

pub use isolate::{validate_file, Depth};
pub use reader::{open_episodes, EpisodeReader, OpenedEpisodes, ReadOptions};
pub use salvage::{recover_partials, RecoveryReport};
pub use writer::{check_new_episode, EpisodeWriter, WriteOptions, PARTIAL_SUFFIX};

use crate::data::image::ChannelOrder;
use std::fmt;
use std::path::{Path, PathBuf};

/// `[linear_x, linear_y, angular_z]`, as published on `/cmd_vel`.
pub type Action = [f32; 3];

/// Number of action dimensions stored per frame.
pub const ACTION_DIM: usize = 3;

/// The fork's `action_chunk_size` attribute value.
pub const DEFAULT_ACTION_CHUNK_SIZE: i64 = 8;

/// Channel order assumed for files that lack `image_channel_order`: the fork's collector stores
/// the camera's frames through `cv_bridge` as `bgr8`, so legacy files are BGR.
pub const DEFAULT_CHANNEL_ORDER: ChannelOrder = ChannelOrder::Bgr;

/// Length of the fixed-size `language_instruction` string (numpy `S256`).
pub const INSTRUCTION_LEN: usize = 256;

/// Dataset and attribute names, spelled once.
pub mod keys {
    pub const IMAGES: &str = "images";
    pub const ACTIONS: &str = "actions";
    pub const EVENTS: &str = "action_event_types";
    pub const INSTRUCTION: &str = "language_instruction";
    pub const EPISODE_NAME: &str = "episode_name";
    pub const TOTAL_DURATION: &str = "total_duration";
    pub const NUM_FRAMES: &str = "num_frames";
    pub const ACTION_CHUNK_SIZE: &str = "action_chunk_size";
    pub const CHANNEL_ORDER: &str = "image_channel_order";
    pub const OBSTACLE_LAYOUT_TYPE: &str = "obstacle_layout_type";
    pub const TIME_PERIOD: &str = "time_period";
    pub const COLLECTION_DATETIME: &str = "collection_datetime";
    pub const COLLECTION_HOUR: &str = "collection_hour";
    pub const COLLECTION_MINUTE: &str = "collection_minute";
}

/// What happened at a step, as the fork's keyboard collector labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    EpisodeStart,
    StartAction,
    StopAction,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpisodeStart => "episode_start",
            Self::StartAction => "start_action",
            Self::StopAction => "stop_action",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "episode_start" => Some(Self::EpisodeStart),
            "start_action" => Some(Self::StartAction),
            "stop_action" => Some(Self::StopAction),
            _ => None,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The newer collector's optional metadata attributes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectionInfo {
    pub obstacle_layout_type: Option<String>,
    pub time_period: Option<String>,
    pub collection_datetime: Option<String>,
    pub collection_hour: Option<i64>,
    pub collection_minute: Option<i64>,
}

/// Everything about an episode except its frames.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeMeta {
    pub episode_name: String,
    pub total_duration: f64,
    pub num_frames: usize,
    pub action_chunk_size: i64,
    /// Order of the stored frames' channels.
    pub channel_order: ChannelOrder,
    /// False when the file had no `image_channel_order` and [`ReadOptions::default_channel_order`] was assumed.
    pub channel_order_recorded: bool,
    /// The stored `language_instruction`, if any.
    pub stored_instruction: Option<String>,
    pub collection: CollectionInfo,
    /// Frame size (height, width).
    pub frame_size: (u32, u32),
}

impl EpisodeMeta {
    /// The stored instruction, else the one the fork's older loader derives from the file name.
    pub fn instruction(&self) -> Option<String> {
        self.stored_instruction
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| instruction_from_name(&self.episode_name))
    }
}

/// The fork's older loader: a scenario word `{1,2}box_{vert,hori}_{left,right}` in the file name
/// selects "Navigate around the obstacle on the {left|right} side and reach the cup".
pub fn instruction_from_name(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    for boxes in ["1box", "2box"] {
        for layout in ["vert", "hori"] {
            for side in ["left", "right"] {
                if lower.contains(&format!("{boxes}_{layout}_{side}")) {
                    return Some(format!(
                        "Navigate around the obstacle on the {side} side and reach the cup"
                    ));
                }
            }
        }
    }
    None
}

/// One problem found in an episode file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    /// Dataset or attribute name (`file` for the container itself).
    pub field: String,
    pub problem: String,
}

impl Defect {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

fn join_defects(defects: &[Defect]) -> String {
    defects
        .iter()
        .map(Defect::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum EpisodeError {
    #[error("{path}: {} defect(s): {}", defects.len(), join_defects(defects))]
    Invalid { path: PathBuf, defects: Vec<Defect> },
    #[error("{path}: HDF5 error on `{field}`: {source}")]
    Hdf5 {
        path: PathBuf,
        field: String,
        source: hdf5::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: frame {index} is {got_w}x{got_h}, but this episode's frames are {want_w}x{want_h}"
    )]
    FrameSize {
        path: PathBuf,
        index: usize,
        want_w: u32,
        want_h: u32,
        got_w: u32,
        got_h: u32,
    },
    #[error("{path}: action {index} {action:?} is not finite; refusing to record NaN/Inf")]
    NonFiniteAction {
        path: PathBuf,
        index: usize,
        action: Action,
    },
    #[error("{path}: frame index {index} out of range (episode has {len} frames)")]
    FrameIndex {
        path: PathBuf,
        index: usize,
        len: usize,
    },
    #[error("{path}: the writer is already closed")]
    Closed { path: PathBuf },
    #[error("{path}: episode has no frames; nothing written")]
    Empty { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite an episode")]
    Exists { path: PathBuf },
    #[error(
        "invalid episode name {name:?}: use a plain file stem (no `/`, not empty, no leading `.`)"
    )]
    BadName { name: String },
    #[error("language instruction is {len} bytes; the format stores at most {INSTRUCTION_LEN}")]
    InstructionTooLong { len: usize },
}

impl EpisodeError {
    pub(crate) fn hdf5(path: &Path, field: &str, source: hdf5::Error) -> Self {
        Self::Hdf5 {
            path: path.to_path_buf(),
            field: field.to_string(),
            source,
        }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = EpisodeError> = std::result::Result<T, E>;

/// `YYYYMMDD_HHMMSS` in UTC for Unix seconds, the time part of the fork's episode names (Howard Hinnant's civil-from-days).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `<prefix>_<YYYYmmdd_HHMMSS>[_<suffix>]` in UTC of `unix_secs`, the fork's naming
/// (`episode_20251203_122510_1box_hori_left`; the dataset reads instructions from its scenario
/// words), made unique in `dir` with `_2`, `_3`, … while a finished or partial episode has it.
pub fn episode_name(dir: &Path, prefix: &str, unix_secs: u64, suffix: &str) -> String {
    let mut base = format!("{prefix}_{}", utc_stamp(unix_secs));
    if !suffix.is_empty() {
        base = format!("{base}_{suffix}");
    }
    let taken =
        |n: &str| dir.join(format!("{n}.h5")).exists() || writer::partial_path(dir, n).exists();
    let mut name = base.clone();
    let mut k = 2;
    while taken(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}

/// The `.h5` files of a directory, sorted by name (partials and hidden files skipped).
pub fn list_episodes(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| EpisodeError::io(dir, e))? {
        let path = entry.map_err(|e| EpisodeError::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if !hidden && path.is_file() && path.extension().is_some_and(|e| e == "h5") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_from_scenario_words() {
        assert_eq!(
            instruction_from_name("episode_20251203_122510_1box_hori_left_core_medium").as_deref(),
            Some("Navigate around the obstacle on the left side and reach the cup")
        );
        assert_eq!(
            instruction_from_name("episode_2box_vert_right").as_deref(),
            Some("Navigate around the obstacle on the right side and reach the cup")
        );
        assert_eq!(instruction_from_name("episode_20251203_122510"), None);
    }

    #[test]
    fn episode_names_follow_the_fork_and_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        // date -u -d @1764764710 → 2025-12-03 12:25:10
        let name = episode_name(dir.path(), "episode", 1_764_764_710, "1box_hori_left");
        assert_eq!(name, "episode_20251203_122510_1box_hori_left");
        std::fs::write(dir.path().join(format!("{name}.h5")), b"").unwrap();
        std::fs::write(dir.path().join(".ep_19700101_000000_2.h5.partial"), b"").unwrap();
        assert_eq!(
            episode_name(dir.path(), "episode", 1_764_764_710, "1box_hori_left"),
            "episode_20251203_122510_1box_hori_left_2"
        );
        assert_eq!(episode_name(dir.path(), "ep", 0, ""), "ep_19700101_000000");
        std::fs::write(dir.path().join("ep_19700101_000000.h5"), b"").unwrap();
        assert_eq!(
            episode_name(dir.path(), "ep", 0, ""),
            "ep_19700101_000000_3"
        );
        assert_eq!(utc_stamp(951_782_400), "20000229_000000");
    }

    #[test]
    fn event_names_round_trip() {
        for e in [
            EventType::EpisodeStart,
            EventType::StartAction,
            EventType::StopAction,
        ] {
            assert_eq!(EventType::parse(e.as_str()), Some(e));
        }
        assert_eq!(EventType::parse("jump"), None);
    }
}
