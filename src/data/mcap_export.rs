//! Episodes as MCAP, the way `ros2 bag record -s mcap` stores topics (profile `ros2`, CDR messages,
//! `ros2msg` schemas), so Foxglove and `ros2 bag play` open them: `/image` (sensor_msgs/Image in the
//! stored channel order), `/cmd_vel` (geometry_msgs/Twist), `/instruction` and `/action_event`
//! (std_msgs/String). The Mobile VLA format keeps no per-frame times, so frames are spread evenly
//! over the episode's `total_duration`; several episodes follow one another with a 1 s gap.

use crate::data::bag::cdr::{self, Header};
use crate::data::bag::{IMAGE_TYPE, STRING_TYPE, TWIST_TYPE};
use crate::data::episode::{EpisodeError, EpisodeReader};
use crate::data::image::ChannelOrder;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

pub const IMAGE_TOPIC: &str = "/image";
pub const CMD_TOPIC: &str = "/cmd_vel";
pub const INSTRUCTION_TOPIC: &str = "/instruction";
pub const EVENT_TOPIC: &str = "/action_event";

const SEPARATOR: &str =
    "================================================================================";
/// Message definitions with their dependencies, as rosbag2 writes them into `ros2msg` schemas.
fn definition(ty: &str) -> String {
    let time = "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n";
    match ty {
        IMAGE_TYPE => format!(
            "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n\
             uint32 step\nuint8[] data\n{SEPARATOR}\nMSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\n\
             string frame_id\n{SEPARATOR}\n{time}"
        ),
        TWIST_TYPE => format!(
            "Vector3 linear\nVector3 angular\n{SEPARATOR}\nMSG: geometry_msgs/Vector3\nfloat64 x\n\
             float64 y\nfloat64 z\n"
        ),
        _ => "string data\n".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum McapExportError {
    #[error(transparent)]
    Episode(#[from] EpisodeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: writing MCAP: {source}")]
    Mcap {
        path: PathBuf,
        source: mcap::McapError,
    },
}

pub type Result<T> = std::result::Result<T, McapExportError>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub episodes: usize,
    pub frames: usize,
    pub messages: usize,
}

struct Channels {
    image: u16,
    cmd: u16,
    instruction: u16,
    event: u16,
}

/// Writes `episodes` (in order) into one MCAP file at `out`, atomically (temp file + rename).
pub fn export_mcap(episodes: &[EpisodeReader], out: &Path) -> Result<ExportSummary> {
    let tmp = out.with_file_name(format!(
        ".{}.partial",
        out.file_name()
            .map_or("export.mcap".into(), |n| n.to_string_lossy())
    ));
    let io = |source| McapExportError::Io {
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(&tmp).map_err(io)?;
    let summary = write_all(episodes, BufWriter::new(file), out);
    match summary {
        Ok(s) => {
            std::fs::rename(&tmp, out).map_err(io)?;
            Ok(s)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_all(
    episodes: &[EpisodeReader],
    sink: BufWriter<File>,
    out: &Path,
) -> Result<ExportSummary> {
    let mcap_err = |source| McapExportError::Mcap {
        path: out.to_path_buf(),
        source,
    };
    let mut w = mcap::WriteOptions::new()
        .profile("ros2")
        .library(concat!("mobile_vla ", env!("CARGO_PKG_VERSION")))
        .create(sink)
        .map_err(mcap_err)?;
    let mut channel = |topic: &str, ty: &str| -> Result<u16> {
        let schema = w
            .add_schema(ty, "ros2msg", definition(ty).as_bytes())
            .map_err(mcap_err)?;
        w.add_channel(schema, topic, "cdr", &BTreeMap::new())
            .map_err(mcap_err)
    };
    let ch = Channels {
        image: channel(IMAGE_TOPIC, IMAGE_TYPE)?,
        cmd: channel(CMD_TOPIC, TWIST_TYPE)?,
        instruction: channel(INSTRUCTION_TOPIC, STRING_TYPE)?,
        event: channel(EVENT_TOPIC, STRING_TYPE)?,
    };
    let mut summary = ExportSummary::default();
    let mut start_ns = 0u64;
    for ep in episodes {
        let end = write_episode(&mut w, &ch, ep, start_ns, &mut summary, out)?;
        start_ns = end + 1_000_000_000;
        summary.episodes += 1;
    }
    w.finish().map_err(mcap_err)?;
    let file = w
        .into_inner()
        .into_inner()
        .map_err(|e| McapExportError::Io {
            path: out.to_path_buf(),
            source: e.into_error(),
        })?;
    file.sync_all().map_err(|source| McapExportError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(summary)
}

/// Writes one episode from `start_ns`; returns the time of its last message.
fn write_episode(
    w: &mut mcap::Writer<BufWriter<File>>,
    ch: &Channels,
    ep: &EpisodeReader,
    start_ns: u64,
    summary: &mut ExportSummary,
    out: &Path,
) -> Result<u64> {
    let meta = ep.meta();
    let n = ep.len();
    let step_ns = if n > 1 {
        (meta.total_duration.max(0.0) * 1e9 / (n - 1) as f64) as u64
    } else {
        0
    };
    let encoding = match meta.channel_order {
        ChannelOrder::Bgr => "bgr8",
        ChannelOrder::Rgb => "rgb8",
    };
    let mut put = |channel_id: u16, t: u64, data: &[u8]| {
        let header = mcap::records::MessageHeader {
            channel_id,
            sequence: summary.messages as u32,
            log_time: t,
            publish_time: t,
        };
        summary.messages += 1;
        w.write_to_known_channel(&header, data)
            .map_err(|source| McapExportError::Mcap {
                path: out.to_path_buf(),
                source,
            })
    };
    if let Some(text) = ep.instruction() {
        put(ch.instruction, start_ns, &cdr::encode_string(&text))?;
    }
    let (h, wd) = meta.frame_size;
    let mut t = start_ns;
    for i in 0..n {
        t = start_ns + i as u64 * step_ns;
        let frame = ep.read_frame_stored(i)?;
        let image = cdr::Image {
            header: Header {
                sec: (t / 1_000_000_000) as i32,
                nanosec: (t % 1_000_000_000) as u32,
                frame_id: "camera".into(),
            },
            height: h,
            width: wd,
            encoding: encoding.into(),
            is_bigendian: false,
            step: wd * 3,
            data: frame.as_raw(),
        };
        put(ch.image, t, &cdr::encode_image(&image))?;
        let [vx, vy, wz] = ep.actions()[i];
        let twist = cdr::Twist {
            linear: [vx.into(), vy.into(), 0.0],
            angular: [0.0, 0.0, wz.into()],
        };
        put(ch.cmd, t, &cdr::encode_twist(&twist))?;
        put(ch.event, t, &cdr::encode_string(ep.events()[i].as_str()))?;
        summary.frames += 1;
    }
    Ok(t)
}
