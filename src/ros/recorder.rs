//! `recorder_node`: camera + instruction + velocity commands → Mobile VLA episodes.
//!
//! Episodes start with `~/start_episode` (mobile_vla/srv/StartEpisode), which answers once the
//! writer has opened the file (a bad name, a taken name or a too long instruction is refused
//! up front), and end with `~/stop_episode` (std_srvs/Trigger, saved) or `~/discard_episode`
//! (deleted), or by the idle timeout. Steps are chosen by [`Sampler`], the rule bag import
//! uses too: per command change (`mode: event`, the fork's keyboard collector) or at `rate_hz`
//! (`mode: rate`). Frames go to a writer thread that never blocks this task; the state is
//! published on `~/status` at each change and at `status_rate_hz`.
//!
//! A managed node ([`lifecycle`]): configure prepares `output_dir` (writable, interrupted
//! episodes salvaged) and starts the writer; episodes start only while active; deactivate saves
//! the episode in progress, as stop_episode does, before it returns; cleanup ends the writer;
//! shutdown saves first. `autostart` (the default) walks to active at start.

use super::convert::{camera_frame, twist_to_action};
use super::lifecycle::{self, Transition};
use super::params::NodeParams;
use super::runtime::NodeHandle;
use super::{command_qos, image_qos, status_qos};
use crate::data::episode::{check_new_episode, episode_name, WriteOptions};
use crate::data::image::ChannelOrder;
use crate::data::recording::CameraFrame;
use crate::data::sampling::{nanos, period, seconds, SampleMode, Sampler, SamplerConfig};
use futures::{Stream, StreamExt};
use r2r::geometry_msgs::msg::{Twist, TwistStamped};
use r2r::mobile_vla::msg::RecordingStatus;
use r2r::mobile_vla::srv::StartEpisode;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::String as StringMsg;
use r2r::std_srvs::srv::Trigger;
use r2r::RosParams;
use serde::Deserialize;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

mod session;
mod writer;

use session::{
    on_sink_event, publish_status, respond_start, save_episode, step, take_waiting, writer_stopped,
    LatestImage, Recording,
};
use writer::{close, prepare, Writer};

pub const NAME: &str = "recorder_node";
pub const DEFAULTS: &str = include_str!("../../config/recorder_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct RecorderParams {
    /// Configure and activate at start; false: wait unconfigured for lifecycle transitions
    pub autostart: bool,
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
    /// In event mode, the return to zero is a stop_action frame
    pub record_stops: bool,
    /// Stop (and save) the episode after this long without commands [s]; 0 disables
    pub idle_timeout_s: f64,
    /// A step waits up to this long for a camera frame when the newest is older; then it is skipped [s]
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
    sampling: SamplerConfig,
    order: ChannelOrder,
    gzip: Option<u8>,
    dir: PathBuf,
    idle_timeout: Option<Duration>,
    max_image_age: Duration,
    status_period: Duration,
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
        let param = |e: String| anyhow::anyhow!("parameter {e}");
        let sampling = SamplerConfig {
            mode,
            period: period("`rate_hz`", self.rate_hz).map_err(param)?,
            cmd_timeout: seconds("`cmd_timeout_s`", self.cmd_timeout_s).map_err(param)?,
            record_stops: self.record_stops,
        };
        let idle_timeout = match self.idle_timeout_s {
            0.0 => None,
            s => Some(seconds("`idle_timeout_s`", s).map_err(param)?),
        };
        Ok(Validated {
            sampling,
            order,
            gzip,
            dir: PathBuf::from(&self.output_dir),
            idle_timeout,
            max_image_age: seconds("`max_image_age_s`", self.max_image_age_s).map_err(param)?,
            status_period: period("`status_rate_hz`", self.status_rate_hz).map_err(param)?,
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

/// How long a transition that ends an episode waits for the writer to save it.
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(h: NodeHandle<RecorderParams>) -> anyhow::Result<()> {
    let p = h.params();
    let v = p.validate()?;
    let mut lifecycle = lifecycle::start(&h, p.autostart)?;

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

    // Configured: Some; active: episodes may start.
    let mut writer: Option<Writer> = None;
    let mut active = false;
    // Sampler time: nanoseconds since the node started.
    let origin = Instant::now();
    let ns = |t: Instant| nanos(t.duration_since(origin));
    let mut sampler = Sampler::new(v.sampling);
    let mut latest = LatestImage {
        frame: None,
        at: None,
    };
    let mut instruction = p.instruction.clone();
    let mut rec: Option<Recording> = None;
    // The episode the writer is finishing after a stop (state SAVING until it reports).
    let mut saving: Option<String> = None;
    let mut status = RecordingStatus::default();
    let mut status_tick = tokio::time::interval(v.status_period);
    let mut skipped_no_image = 0u64;

    loop {
        let now = Instant::now();
        let state_before = (rec.is_some(), saving.is_some());
        let next_tick = sampler
            .next_tick()
            .filter(|_| rec.as_ref().is_some_and(|r| r.first.is_none()));
        let tick_at = origin + Duration::from_nanos(next_tick.unwrap_or(0));
        // Biased, in this order: when a frame and a command are both pending (a busy CPU),
        // the frame is taken first, so the command is paired with the newest image.
        tokio::select! {
            biased;
            _ = h.shutdown() => break,
            pending = lifecycle.next() => {
                let result = match pending.transition {
                    Transition::Configure => prepare(&p, &v).map(|w| writer = Some(w)).map_err(|e| format!("{e:#}")),
                    Transition::Activate => {
                        active = true;
                        Ok(())
                    }
                    Transition::Deactivate | Transition::Cleanup | Transition::Shutdown => {
                        active = false;
                        if let Some(w) = writer.as_mut() {
                            let why = format!("`{}` transition: the episode ends here", pending.transition.label());
                            let saved = save_episode(&mut rec, &w.sink, &mut sampler, &mut saving, &mut status, &mut skipped_no_image, &why);
                            if let Some(Err(e)) = saved {
                                warn!("{why}: the episode in progress could not be saved: {e}");
                            }
                            // The transition ends with the episode on disk (or the writer's reason why not).
                            let wait = async {
                                while saving.is_some() {
                                    let Some(event) = w.events.next().await else { break };
                                    on_sink_event(event, &mut rec, &mut saving, &mut status, &mut sampler);
                                }
                            };
                            if tokio::time::timeout(SAVE_TIMEOUT, wait).await.is_err() {
                                warn!("the writer is still saving after {SAVE_TIMEOUT:?}; it goes on in the background");
                            }
                        }
                        if pending.transition != Transition::Deactivate {
                            if let Some(w) = writer.take() {
                                close(w, &mut rec, &mut saving, &mut status, &mut sampler);
                            }
                        }
                        Ok(())
                    }
                };
                lifecycle.finish(pending, result);
            }
            Some(frame) = frames.next() => {
                if rec.as_ref().is_some_and(|r| r.first.is_some()) && v.sampling.mode == SampleMode::Rate {
                    // Rate steps count from the episode's first frame.
                    sampler.start(ns(now));
                }
                if let Some(w) = writer.as_mut() {
                    skipped_no_image += take_waiting(&mut w.sink, &mut rec, &mut status, &frame, v.max_image_age, now);
                }
                latest = LatestImage { frame: Some(frame), at: Some(now) };
            }
            Some(cmd) = cmds.next() => {
                if let (Some(s), Some(w), true) = (sampler.command(ns(now), cmd), writer.as_mut(), rec.is_some()) {
                    skipped_no_image += step(&mut w.sink, &mut rec, &mut status, &latest, v.max_image_age, now, s);
                }
            }
            Some(msg) = instructions.next() => {
                instruction = msg.data;
            }
            _ = tokio::time::sleep_until(tick_at.into()), if next_tick.is_some() => {
                while let (Some((_, s)), Some(w)) = (sampler.tick_before(ns(now) + 1), writer.as_mut()) {
                    skipped_no_image += step(&mut w.sink, &mut rec, &mut status, &latest, v.max_image_age, now, s);
                }
            }
            Some(event) = async { writer.as_mut().expect("guarded").events.next().await }, if writer.is_some() => {
                on_sink_event(event, &mut rec, &mut saving, &mut status, &mut sampler);
            }
            Some(req) = start_srv.next() => {
                let refused = match (&rec, writer.as_ref().filter(|_| active)) {
                    (_, None) => Some(format!(
                        "recorder_node is {}: episodes start only while it is active (ros2 lifecycle set <node> activate)",
                        lifecycle.state().label()
                    )),
                    (Some(r), _) => Some(format!("already recording {}", r.name)),
                    (None, Some(w)) => {
                        let sink = &w.sink;
                        let suffix = &p.scenario;
                        let name = if req.message.episode_name.is_empty() {
                            let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                            episode_name(&v.dir, &p.episode_prefix, secs, suffix)
                        } else {
                            req.message.episode_name.clone()
                        };
                        let text = [&req.message.instruction, &instruction, &p.instruction]
                            .into_iter()
                            .find(|s| !s.trim().is_empty())
                            .cloned()
                            .unwrap_or_default();
                        let instruction = (!text.is_empty()).then(|| text.clone());
                        let opts = WriteOptions::default()
                            .gzip_level(v.gzip)
                            .compression_threads(p.compression_threads as usize)
                            .channel_order(v.order)
                            .instruction(instruction.clone());
                        match check_new_episode(&v.dir, &name, instruction.as_deref()) {
                            Err(e) => Some(format!("cannot record: {e}")),
                            Ok(()) => match sink.start(&v.dir, &name, opts) {
                                Err(e) => Some(writer_stopped(&e, &mut status)),
                                Ok(()) => {
                                    info!("recording {name}: \"{text}\"");
                                    // From rest: a key held before the start is a step at its next change.
                                    let first = sampler.start(ns(now));
                                    rec = Some(Recording { name, instruction: text, started: now, frames_queued: 0, first: Some(first), waiting: Vec::new(), pending: None });
                                    None
                                }
                            },
                        }
                    }
                };
                if let (None, Some(w), Some(f)) = (&refused, writer.as_mut(), latest.fresh(now, v.max_image_age)) {
                    take_waiting(&mut w.sink, &mut rec, &mut status, &f, v.max_image_age, now);
                }
                match (refused, rec.as_mut()) {
                    (Some(message), _) => {
                        warn!("start_episode refused: {message}");
                        respond_start(req, false, message, String::new());
                    }
                    // Answered when the writer reports the file open.
                    (None, Some(r)) => r.pending = Some(req),
                    (None, None) => respond_start(req, false, status.last_error.clone(), String::new()),
                }
            }
            Some(req) = stop_srv.next() => {
                let saved = writer.as_ref().and_then(|w| {
                    save_episode(&mut rec, &w.sink, &mut sampler, &mut saving, &mut status, &mut skipped_no_image,
                                 "stopped before the writer opened the file")
                });
                let (success, message) = match saved {
                    Some(Ok(m)) => (true, m),
                    Some(Err(e)) => (false, e),
                    None => (false, "not recording".to_string()),
                };
                if let Err(e) = req.respond(Trigger::Response { success, message }) {
                    warn!("stop_episode: cannot respond: {e}");
                }
            }
            Some(req) = discard_srv.next() => {
                let (success, message) = match (rec.take(), writer.as_ref()) {
                    (Some(r), Some(w)) => {
                        sampler.stop();
                        if let Some(pending) = r.pending {
                            respond_start(pending, false, "discarded before the writer opened the file".into(), r.name.clone());
                        }
                        match w.sink.abort() {
                            Ok(()) => (true, format!("discarded {}", r.name)),
                            Err(e) => (false, writer_stopped(&e, &mut status)),
                        }
                    }
                    _ => (false, "not recording".to_string()),
                };
                if let Err(e) = req.respond(Trigger::Response { success, message }) {
                    warn!("discard_episode: cannot respond: {e}");
                }
            }
            _ = status_tick.tick() => {
                if let (Some(r), Some(limit), Some(w)) = (&rec, v.idle_timeout, writer.as_ref()) {
                    let idle = sampler.since_command(ns(now)).map_or_else(|| now.duration_since(r.started), Duration::from_nanos);
                    if idle > limit {
                        info!("{}: no command for {:.1} s, stopping", r.name, idle.as_secs_f64());
                        save_episode(&mut rec, &w.sink, &mut sampler, &mut saving, &mut status, &mut skipped_no_image,
                                     "stopped by the idle timeout before the writer opened the file");
                    }
                }
                publish_status(&h, &status_pub, &mut status, writer.as_ref().map(|w| &w.sink), rec.as_ref(), saving.as_deref(), now);
                continue;
            }
        }
        if state_before != (rec.is_some(), saving.is_some()) {
            publish_status(
                &h,
                &status_pub,
                &mut status,
                writer.as_ref().map(|w| &w.sink),
                rec.as_ref(),
                saving.as_deref(),
                Instant::now(),
            );
        }
    }

    // A clean shutdown keeps the episode in progress: it is finished and saved.
    if let Some(w) = writer {
        save_episode(
            &mut rec,
            &w.sink,
            &mut sampler,
            &mut saving,
            &mut status,
            &mut skipped_no_image,
            "the node is shutting down",
        );
        close(w, &mut rec, &mut saving, &mut status, &mut sampler);
    }
    info!(
        "recorder_node: {} episode(s) saved, {} frame(s) dropped, {} step(s) without an image",
        status.episodes_saved, status.frames_dropped, skipped_no_image
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sampling::SampleMode;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let p: RecorderParams =
            crate::ros::params::from_yaml(DEFAULTS, "config/recorder_node.yaml", NAME).unwrap();
        let v = p.validate().unwrap();
        assert_eq!(v.sampling.mode, SampleMode::Event);
        assert!(v.sampling.record_stops);
        assert_eq!(v.order, ChannelOrder::Bgr);
        let mut bad = p.clone();
        bad.gzip_level = 12;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gzip_level"));
        let mut bad = p.clone();
        bad.mode = "sometimes".into();
        assert!(bad.validate().unwrap_err().to_string().contains("`mode`"));
        // Fails before the fix: Duration::from_secs_f64(1 / rate_hz) panicked at start-up.
        for (name, set) in [
            (
                "`rate_hz`",
                (|b: &mut RecorderParams| b.rate_hz = 1e-300) as fn(&mut RecorderParams),
            ),
            ("`idle_timeout_s`", |b| b.idle_timeout_s = 1e300),
            ("`max_image_age_s`", |b| b.max_image_age_s = -1.0),
            ("`status_rate_hz`", |b| b.status_rate_hz = f64::INFINITY),
        ] {
            let mut bad = p.clone();
            set(&mut bad);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
