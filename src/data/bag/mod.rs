//! rosbag2 input: `metadata.yaml`, the MCAP and sqlite3 storage plugins' files (plain, zstd per
//! file or per message, MCAP chunks zstd or lz4), and CDR decoding of the standard messages;
//! [`import`] turns a bag into Mobile VLA episodes.

pub mod cdr;
pub mod import;
mod storage;

pub use import::{import_bag, ImportOptions, ImportSummary};
pub use storage::{BagMessage, MessageStream};

use crate::data::episode::EpisodeError;
use crate::data::image::ImageError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const IMAGE_TYPE: &str = "sensor_msgs/msg/Image";
pub const COMPRESSED_IMAGE_TYPE: &str = "sensor_msgs/msg/CompressedImage";
pub const TWIST_TYPE: &str = "geometry_msgs/msg/Twist";
pub const TWIST_STAMPED_TYPE: &str = "geometry_msgs/msg/TwistStamped";
pub const STRING_TYPE: &str = "std_msgs/msg/String";

#[derive(Debug, thiserror::Error)]
pub enum BagError {
    #[error("{dir}: no metadata.yaml; pass a rosbag2 directory (as written by `ros2 bag record`)")]
    NoMetadata { dir: PathBuf },
    #[error("{path}: {source}")]
    Metadata {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage `{0}` is not supported (use `mcap` or `sqlite3`)")]
    Storage(String),
    #[error("bag compression `{0}` is not supported (rosbag2 writes `zstd` in mode `file` or `message`); decompress it first (`ros2 bag convert`)")]
    Compressed(String),
    #[error("{path}: zstd decompression failed: {source}")]
    Zstd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt MCAP after {after} message record(s): {source}")]
    Mcap {
        path: PathBuf,
        after: u64,
        source: mcap::McapError,
    },
    #[error("{path}: corrupt MCAP after {after} message record(s): the MCAP reader failed on its chunk data; re-record the bag or convert it with `ros2 bag convert`")]
    McapReader { path: PathBuf, after: u64 },
    #[error("{path}: corrupt or unreadable sqlite3 bag: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: message {index} refers to unknown topic/channel id {id}")]
    UnknownChannel { path: PathBuf, index: u64, id: i64 },
    #[error("topic `{topic}` is not in the bag; its topics: {}", available.join(", "))]
    NoSuchTopic {
        topic: String,
        available: Vec<String>,
    },
    #[error("topic `{topic}` has type `{type_name}`; expected {expected}")]
    TopicType {
        topic: String,
        type_name: String,
        expected: String,
    },
    #[error("no {kind} topic in the bag (types {expected}); its topics: {}", available.join(", "))]
    NoTopic {
        kind: &'static str,
        expected: String,
        available: Vec<String>,
    },
    #[error("several {kind} topics ({}); choose one with {flag}", candidates.join(", "))]
    AmbiguousTopic {
        kind: &'static str,
        candidates: Vec<String>,
        flag: &'static str,
    },
    #[error("topic `{topic}` uses serialization `{format}`; only `cdr` is supported")]
    Serialization { topic: String, format: String },
    #[error("topic `{topic}`, message {index}: {source}")]
    Decode {
        topic: String,
        index: u64,
        source: cdr::CdrError,
    },
    #[error("topic `{topic}`, message {index}: {source}")]
    Image {
        topic: String,
        index: u64,
        source: ImageError,
    },
    #[error("topic `{topic}`, message {index}: velocity command is not finite ({twist})")]
    NonFinite {
        topic: String,
        index: u64,
        twist: cdr::Twist,
    },
    #[error("topic `{topic}`, message {index}: {source}")]
    Frame {
        topic: String,
        index: u64,
        source: EpisodeError,
    },
    #[error(transparent)]
    Episode(#[from] EpisodeError),
}

pub type Result<T, E = BagError> = std::result::Result<T, E>;

/// `metadata.yaml`, the parts we use.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub rosbag2_bagfile_information: BagInfo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BagInfo {
    #[serde(default)]
    pub version: u32,
    pub storage_identifier: String,
    #[serde(default)]
    pub relative_file_paths: Vec<String>,
    #[serde(default)]
    pub message_count: u64,
    #[serde(default)]
    pub topics_with_message_count: Vec<TopicWithCount>,
    #[serde(default)]
    pub compression_format: String,
    #[serde(default)]
    pub compression_mode: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopicWithCount {
    pub topic_metadata: TopicMetadata,
    #[serde(default)]
    pub message_count: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopicMetadata {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(default)]
    pub serialization_format: String,
}

/// rosbag2's own compression (`ros2 bag record --compression-mode … --compression-format zstd`),
/// on top of the storage's (MCAP chunk compression, which the MCAP reader handles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// Each storage file is one zstd stream (`<file>.mcap.zstd`, `<file>.db3.zstd`).
    File,
    /// Each message's data is one zstd frame.
    Message,
}

impl Compression {
    fn from_metadata(info: &BagInfo) -> Result<Self> {
        let (mode, format) = (
            info.compression_mode.to_ascii_lowercase(),
            &info.compression_format,
        );
        let mode = match mode.as_str() {
            "" | "none" => return Ok(Self::None),
            "file" => Self::File,
            "message" => Self::Message,
            _ => return Err(BagError::Compressed(format!("{format} ({mode})"))),
        };
        if !format.eq_ignore_ascii_case("zstd") {
            return Err(BagError::Compressed(format!(
                "{format} ({})",
                info.compression_mode
            )));
        }
        Ok(mode)
    }
}

/// Which storage plugin wrote the bag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Mcap,
    Sqlite3,
}

/// An opened (not yet read) rosbag2 directory.
#[derive(Debug, Clone)]
pub struct Bag {
    pub dir: PathBuf,
    pub storage: Storage,
    pub compression: Compression,
    pub files: Vec<PathBuf>,
    pub info: BagInfo,
}

impl Bag {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("metadata.yaml");
        if !path.is_file() {
            return Err(BagError::NoMetadata {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| BagError::Io {
            path: path.clone(),
            source: e,
        })?;
        let meta: Metadata =
            serde_yaml::from_str(&text).map_err(|e| BagError::Metadata { path, source: e })?;
        let info = meta.rosbag2_bagfile_information;
        let storage = match info.storage_identifier.as_str() {
            "mcap" => Storage::Mcap,
            "sqlite3" => Storage::Sqlite3,
            other => return Err(BagError::Storage(other.to_string())),
        };
        let compression = Compression::from_metadata(&info)?;
        let files = info
            .relative_file_paths
            .iter()
            .map(|f| dir.join(f))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            storage,
            compression,
            files,
            info,
        })
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicMetadata> {
        self.info
            .topics_with_message_count
            .iter()
            .map(|t| &t.topic_metadata)
    }

    pub fn topic(&self, name: &str) -> Option<&TopicWithCount> {
        self.info
            .topics_with_message_count
            .iter()
            .find(|t| t.topic_metadata.name == name)
    }

    fn topic_names(&self) -> Vec<String> {
        self.topics()
            .map(|t| format!("{} ({})", t.name, t.type_name))
            .collect()
    }

    /// `given` if it exists and has one of `types`; else the only topic with one of `types`.
    pub fn resolve_topic(
        &self,
        given: Option<&str>,
        types: &[&str],
        kind: &'static str,
        flag: &'static str,
    ) -> Result<Option<String>> {
        let expected = types.join(" or ");
        if let Some(name) = given {
            let t = self.topic(name).ok_or_else(|| BagError::NoSuchTopic {
                topic: name.to_string(),
                available: self.topic_names(),
            })?;
            if !types.contains(&t.topic_metadata.type_name.as_str()) {
                return Err(BagError::TopicType {
                    topic: name.to_string(),
                    type_name: t.topic_metadata.type_name.clone(),
                    expected,
                });
            }
            return Ok(Some(name.to_string()));
        }
        let candidates: Vec<String> = self
            .topics()
            .filter(|t| types.contains(&t.type_name.as_str()))
            .map(|t| t.name.clone())
            .collect();
        match candidates.len() {
            0 => Ok(None),
            1 => Ok(candidates.into_iter().next()),
            _ => Err(BagError::AmbiguousTopic {
                kind,
                candidates,
                flag,
            }),
        }
    }

    /// Messages of `topics`, in recording order (file by file, as written).
    pub fn messages(&self, topics: &[String]) -> Result<MessageStream> {
        for t in topics {
            if let Some(meta) = self.topic(t) {
                let format = &meta.topic_metadata.serialization_format;
                if !format.is_empty() && format != "cdr" {
                    return Err(BagError::Serialization {
                        topic: t.clone(),
                        format: format.clone(),
                    });
                }
            }
        }
        MessageStream::new(
            self.storage,
            self.compression,
            self.files.clone(),
            topics.to_vec(),
        )
    }
}
