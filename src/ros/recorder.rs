//! `recorder_node`: camera + instruction + velocity commands → Mobile VLA episodes.
//!
//! Episodes start with `~/start_episode` (mobile_vla/srv/StartEpisode) and end with
//! `~/stop_episode` (std_srvs/Trigger, saved) or `~/discard_episode` (deleted), or by the
//! idle timeout. Steps are sampled per command change (`mode: event`, the fork's
//! keyboard collector) or at `rate_hz` (`mode: rate`). Frames go to a writer thread
//! through a bounded queue; the state is published on `~/status`.

use super::convert::{camera_frame, twist_to_action};
use super::params::NodeParams;
use super::runtime::NodeHandle;
use super::{command_qos, image_qos, status_qos};
use crate::data::episode::{recover_partials, utc_stamp, EventType, WriteOptions};
use crate::data::image::ChannelOrder;
use crate::data::recording::{CameraFrame, RecordingSink, SampleMode, Sampler, SinkEvent};
use anyhow::Context as _;
use futures::{Stream, StreamExt};
use r2r::geometry_msgs::msg::{Twist, TwistStamped};
use r2r::mobile_vla::msg::RecordingStatus;
use r2r::mobile_vla::srv::StartEpisode;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::{Header, String as StringMsg};
use r2r::std_srvs::srv::Trigger;
use r2r::RosParams;
use serde::Deserialize;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};
use tracing::{error, info, warn};

pub const NAME: &str = "recorder_node";
pub const DEFAULTS: &str = include_str!("../../config/recorder_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct RecorderParams {
    /// Camera topic
    pub image_topic: String,
    /// Subscribe to sensor_msgs/CompressedImage instead of sensor_msgs/Image
    pub compressed: bool,
    /// Instruction topic (std_msgs/String); the latest one is used for new episodes
    pub instruction_topic: String,
    /// Velocity command topic
    pub cmd_topic: String,
    /// Commands are geometry_msgs/TwistStamped instead of Twist
    pub cmd_stamped: bool,
    /// Directory the episodes are written to (created if missing)
    pub output_dir: String,
    /// `event`: one frame per command change; `rate`: frames at rate_hz
    pub mode: String,
    /// Frame rate in rate mode [Hz]
    pub rate_hz: f64,
    /// In rate mode, a command older than this counts as zero [s]
    pub cmd_timeout_s: f64,
    /// Stop (and save) the episode after this long without commands [s]; 0 disables
    pub idle_timeout_s: f64,
    /// Skip a step when the newest image is older than this [s]
    pub max_image_age_s: f64,
    /// Channel order the frames are stored in: bgr (the Mobile VLA format) or rgb
    pub channel_order: String,
    /// gzip level 0-9 of the episode datasets; -1 stores uncompressed
    pub gzip_level: i32,
    /// Threads that compress frames in parallel (0 = inside HDF5, single-threaded)
    pub compression_threads: u32,
    /// Frames that may wait for the writer before new ones are dropped
    pub queue_size: u32,
    /// Episode names are <prefix>_<YYYYmmdd_HHMMSS>[_<scenario>]
    pub episode_prefix: String,
    /// Scenario words appended to episode names (e.g. 1box_hori_left)
    pub scenario: String,
    /// Instruction used when none was given or published
    pub instruction: String,
    /// Status publishing rate [Hz]
    pub status_rate_hz: f64,
}

#[derive(Debug)]
struct Validated {
    mode: SampleMode,
    order: ChannelOrder,
    gzip: Option<u8>,
    dir: PathBuf,
}

impl RecorderParams {
    fn validate(&self) -> anyhow::Result<Validated> {
        let mode = self
            .mode
            .parse()
            .map_err(|e| anyhow::anyhow!("parameter `mode`: {e}"))?;
        let order = self
            .channel_order
            .parse()
            .map_err(|e| anyhow::anyhow!("parameter `channel_order`: {e}"))?;
        let gzip = match self.gzip_level {
            -1 => None,
            l @ 0..=9 => Some(l as u8),
            l => anyhow::bail!("parameter `gzip_level` is {l}: use 0-9, or -1 for none"),
        };
        for (name, v) in [
            ("rate_hz", self.rate_hz),
            ("status_rate_hz", self.status_rate_hz),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                anyhow::bail!("parameter `{name}` is {v}: it must be > 0");
            }
        }
        Ok(Validated {
            mode,
            order,
            gzip,
            dir: PathBuf::from(&self.output_dir),
        })
    }
}

/// Every parameter is read once at start (`LIVE` is empty): `ros2 param set` is refused with
/// the reason instead of being accepted and ignored.
impl NodeParams for RecorderParams {
    fn validate(&self) -> Result<(), String> {
        RecorderParams::validate(self)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

type Frames = Pin<Box<dyn Stream<Item = CameraFrame> + Send>>;
type Commands = Pin<Box<dyn Stream<Item = [f32; 3]> + Send>>;

struct Recording {
    name: String,
    instruction: String,
    started: Instant,
    frames_queued: u32,
    /// The `episode_start` frame still needs an image.
    needs_first_frame: bool,
}

/// Latest camera frame and when it arrived; taken by the step that uses it.
struct LatestImage {
    frame: Option<CameraFrame>,
    at: Option<Instant>,
}

impl LatestImage {
    /// The newest frame if it is younger than `max_age_s`.
    fn fresh(&self, now: Instant, max_age_s: f64) -> Option<CameraFrame> {
        let at = self.at?;
        if now.duration_since(at).as_secs_f64() > max_age_s {
            return None;
        }
        self.frame.clone()
    }
}

pub async fn run(h: NodeHandle<RecorderParams>) -> anyhow::Result<()> {
    let p = h.params();
    let v = p.validate()?;
    std::fs::create_dir_all(&v.dir)
        .with_context(|| format!("cannot create output_dir {}", v.dir.display()))?;
    // What a killed recorder left behind: salvage it before writing anything new.
    let report = recover_partials(&v.dir)?;
    for (path, n) in &report.recovered {
        warn!(
            "recovered {n} frame(s) of an interrupted episode into {}",
            path.display()
        );
    }
    for (path, why) in &report.discarded {
        warn!("discarded interrupted episode {}: {why}", path.display());
    }

    let (
        mut frames,
        mut cmds,
        mut instructions,
        mut start_srv,
        mut stop_srv,
        mut discard_srv,
        status_pub,
    ) = {
        let mut node = h.node();
        let frames: Frames = if p.compressed {
            Box::pin(
                node.subscribe::<CompressedImage>(&p.image_topic, image_qos())?
                    .map(|m| CameraFrame::Compressed {
                        format: m.format,
                        data: m.data,
                    }),
            )
        } else {
            Box::pin(
                node.subscribe::<Image>(&p.image_topic, image_qos())?
                    .map(camera_frame),
            )
        };
        let cmds: Commands = if p.cmd_stamped {
            Box::pin(
                node.subscribe::<TwistStamped>(&p.cmd_topic, command_qos())?
                    .map(|m| twist_to_action(&m.twist)),
            )
        } else {
            Box::pin(
                node.subscribe::<Twist>(&p.cmd_topic, command_qos())?
                    .map(|m| twist_to_action(&m)),
            )
        };
        (
            frames,
            cmds,
            node.subscribe::<StringMsg>(&p.instruction_topic, command_qos())?,
            node.create_service::<StartEpisode::Service>(
                "~/start_episode",
                r2r::QosProfile::services_default(),
            )?,
            node.create_service::<Trigger::Service>(
                "~/stop_episode",
                r2r::QosProfile::services_default(),
            )?,
            node.create_service::<Trigger::Service>(
                "~/discard_episode",
                r2r::QosProfile::services_default(),
            )?,
            node.create_publisher::<RecordingStatus>("~/status", status_qos())?,
        )
    };
    info!(
        "recorder_node: {} ({}) + {} + {} -> {} [{:?} mode, {} order]",
        p.image_topic,
        if p.compressed { "compressed" } else { "raw" },
        p.cmd_topic,
        p.instruction_topic,
        v.dir.display(),
        v.mode,
        v.order
    );

    let mut sink = RecordingSink::spawn(p.queue_size as usize);
    let mut sampler = Sampler::new(v.mode, p.cmd_timeout_s);
    let mut latest = LatestImage {
        frame: None,
        at: None,
    };
    let mut instruction = p.instruction.clone();
    let mut rec: Option<Recording> = None;
    let mut status = RecordingStatus::default();
    let mut rate_tick = tokio::time::interval(Duration::from_secs_f64(1.0 / p.rate_hz));
    rate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut status_tick = tokio::time::interval(Duration::from_secs_f64(1.0 / p.status_rate_hz));
    let mut skipped_no_image = 0u64;

    loop {
        let now = Instant::now();
        // Biased, in this order: when a frame and a command are both pending (a busy CPU),
        // the frame is taken first, so the command is paired with the newest image.
        tokio::select! {
            biased;
            _ = h.shutdown() => break,
            Some(frame) = frames.next() => {
                latest = LatestImage { frame: Some(frame), at: Some(now) };
                if let Some(r) = rec.as_mut().filter(|r| r.needs_first_frame) {
                    if let Some(f) = latest.frame.clone() {
                        r.needs_first_frame = false;
                        if sink.push(f, [0.0; 3], EventType::EpisodeStart) {
                            r.frames_queued += 1;
                        }
                    }
                }
            }
            Some(cmd) = cmds.next() => {
                let step = sampler.on_command(cmd, now);
                if let (Some((action, event)), Some(r)) = (step, rec.as_mut()) {
                    match latest.fresh(now, p.max_image_age_s) {
                        Some(f) => {
                            if sink.push(f, action, event) {
                                r.frames_queued += 1;
                            }
                        }
                        None => {
                            skipped_no_image += 1;
                            warn!("step skipped: no image newer than {} s on {}", p.max_image_age_s, p.image_topic);
                        }
                    }
                }
            }
            Some(msg) = instructions.next() => {
                instruction = msg.data;
            }
            _ = rate_tick.tick(), if v.mode == SampleMode::Rate && rec.as_ref().is_some_and(|r| !r.needs_first_frame) => {
                let (action, event) = sampler.on_tick(now);
                if let Some(r) = rec.as_mut() {
                    match latest.fresh(now, p.max_image_age_s) {
                        Some(f) => {
                            if sink.push(f, action, event) {
                                r.frames_queued += 1;
                            }
                        }
                        None => skipped_no_image += 1,
                    }
                }
            }
            Some(req) = start_srv.next() => {
                let (success, message, name) = if let Some(r) = &rec {
                    (false, format!("already recording {}", r.name), r.name.clone())
                } else {
                    let name = if req.message.episode_name.is_empty() {
                        episode_name(&p.episode_prefix, &p.scenario, SystemTime::now())
                    } else {
                        req.message.episode_name.clone()
                    };
                    let text = [&req.message.instruction, &instruction, &p.instruction]
                        .into_iter()
                        .find(|s| !s.trim().is_empty())
                        .cloned()
                        .unwrap_or_default();
                    let opts = WriteOptions::default()
                        .gzip_level(v.gzip)
                        .compression_threads(p.compression_threads as usize)
                        .channel_order(v.order)
                        .instruction((!text.is_empty()).then(|| text.clone()));
                    sampler.reset();
                    sink.start(&v.dir, &name, opts);
                    let mut r = Recording { name: name.clone(), instruction: text, started: now, frames_queued: 0, needs_first_frame: true };
                    if let Some(f) = latest.fresh(now, p.max_image_age_s) {
                        r.needs_first_frame = false;
                        if sink.push(f, [0.0; 3], EventType::EpisodeStart) {
                            r.frames_queued += 1;
                        }
                    }
                    info!("recording {name}: \"{}\"", r.instruction);
                    rec = Some(r);
                    (true, format!("recording {name}"), name)
                };
                if let Err(e) = req.respond(StartEpisode::Response { success, message, episode_name: name }) {
                    warn!("start_episode: cannot respond: {e}");
                }
            }
            Some(req) = stop_srv.next() => {
                let (success, message) = match rec.take() {
                    Some(r) => {
                        let d = now.duration_since(r.started).as_secs_f64();
                        sink.finish(d);
                        info!("stopping {} after {d:.1} s ({} frames queued)", r.name, r.frames_queued);
                        (true, format!("saving {} ({} frames)", r.name, r.frames_queued))
                    }
                    None => (false, "not recording".to_string()),
                };
                if let Err(e) = req.respond(Trigger::Response { success, message }) {
                    warn!("stop_episode: cannot respond: {e}");
                }
            }
            Some(req) = discard_srv.next() => {
                let (success, message) = match rec.take() {
                    Some(r) => {
                        sink.abort();
                        (true, format!("discarded {}", r.name))
                    }
                    None => (false, "not recording".to_string()),
                };
                if let Err(e) = req.respond(Trigger::Response { success, message }) {
                    warn!("discard_episode: cannot respond: {e}");
                }
            }
            _ = status_tick.tick() => {
                if let Some(r) = &rec {
                    let idle = sampler.idle_s(now).unwrap_or_else(|| now.duration_since(r.started).as_secs_f64());
                    if p.idle_timeout_s > 0.0 && idle > p.idle_timeout_s {
                        let d = now.duration_since(r.started).as_secs_f64();
                        info!("{}: no command for {idle:.1} s, stopping", r.name);
                        sink.finish(d);
                        rec = None;
                    }
                }
                update_status(&mut status, &sink, rec.as_ref(), now);
                status.header = Header { stamp: h.now(), frame_id: String::new() };
                if let Err(e) = status_pub.publish(&status) {
                    warn!("cannot publish status: {e}");
                }
            }
        }
    }

    // A clean shutdown keeps the episode in progress: it is finished and saved.
    if let Some(r) = rec.take() {
        info!("shutting down: saving {}", r.name);
        sink.finish(Instant::now().duration_since(r.started).as_secs_f64());
    }
    let dropped = sink.dropped();
    for e in sink.close() {
        log_sink_event(&e, &mut status);
    }
    info!(
        "recorder_node: {} episode(s) saved, {} frame(s) dropped, {} step(s) without an image",
        status.episodes_saved, dropped, skipped_no_image
    );
    Ok(())
}

fn log_sink_event(e: &SinkEvent, status: &mut RecordingStatus) {
    match e {
        SinkEvent::Saved { path, frames } => {
            info!("saved {} ({frames} frames)", path.display());
            status.episodes_saved += 1;
            status.last_saved_path = path.display().to_string();
        }
        SinkEvent::Discarded { name, reason } => info!("{name} not saved: {reason}"),
        SinkEvent::Error { message } => {
            error!("{message}");
            status.last_error = message.clone();
        }
        SinkEvent::Started { .. } | SinkEvent::Progress { .. } => {}
    }
}

fn update_status(
    status: &mut RecordingStatus,
    sink: &RecordingSink,
    rec: Option<&Recording>,
    now: Instant,
) {
    let mut written = None;
    for e in sink.poll() {
        if let SinkEvent::Progress { frames, .. } = &e {
            written = Some(*frames);
        }
        log_sink_event(&e, status);
    }
    status.frames_dropped = u32::try_from(sink.dropped()).unwrap_or(u32::MAX);
    match rec {
        Some(r) => {
            status.state = RecordingStatus::RECORDING as u8;
            status.episode_name = r.name.clone();
            status.instruction = r.instruction.clone();
            if let Some(n) = written {
                status.frames = n as u32;
            }
            status.duration_s = now.duration_since(r.started).as_secs_f32();
        }
        None => {
            status.state = RecordingStatus::IDLE as u8;
            status.episode_name.clear();
            status.instruction.clear();
            status.frames = 0;
            status.duration_s = 0.0;
        }
    }
}

/// `<prefix>_<YYYYmmdd_HHMMSS>[_<scenario>]` in UTC, the fork's naming
/// (`episode_20251203_122510_1box_hori_left`), whose scenario words the dataset reads
/// instructions from.
pub fn episode_name(prefix: &str, scenario: &str, t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = format!("{prefix}_{}", utc_stamp(secs));
    if !scenario.is_empty() {
        name.push('_');
        name.push_str(scenario);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let p: RecorderParams =
            crate::ros::params::from_yaml(DEFAULTS, "config/recorder_node.yaml", NAME).unwrap();
        let v = p.validate().unwrap();
        assert_eq!(v.mode, SampleMode::Event);
        assert_eq!(v.order, ChannelOrder::Bgr);
        let mut bad = p.clone();
        bad.gzip_level = 12;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gzip_level"));
        let mut bad = p;
        bad.mode = "sometimes".into();
        assert!(bad.validate().unwrap_err().to_string().contains("`mode`"));
    }

    #[test]
    fn episode_names_follow_the_fork() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_764_710); // 2025-12-03 12:25:10 UTC
        assert_eq!(
            episode_name("episode", "1box_hori_left", t),
            "episode_20251203_122510_1box_hori_left"
        );
        assert_eq!(
            episode_name("ep", "", SystemTime::UNIX_EPOCH),
            "ep_19700101_000000"
        );
    }
}
