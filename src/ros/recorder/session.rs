//! recorder_node's episode state between the service calls, the writer's reports and the
//! status topic: what is being recorded, the pending start request, and how each writer
//! report changes them.

use super::RecorderParams;
use crate::data::recording::{CameraFrame, RecordingSink, SinkEvent, WriterStopped};
use crate::data::sampling::{Sampler, Step};
use crate::ros::runtime::NodeHandle;
use r2r::mobile_vla::msg::RecordingStatus;
use r2r::mobile_vla::srv::StartEpisode;
use r2r::std_msgs::msg::Header;
use r2r::ServiceRequest;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

pub(super) struct Recording {
    pub(super) name: String,
    pub(super) instruction: String,
    pub(super) started: Instant,
    pub(super) frames_queued: u32,
    /// The `episode_start` frame still needs an image.
    pub(super) needs_first_frame: bool,
    /// The start request, answered when the writer reports the file open (or not).
    pub(super) pending: Option<ServiceRequest<StartEpisode::Service>>,
}

/// Latest camera frame and when it arrived; taken by the step that uses it.
pub(super) struct LatestImage {
    pub(super) frame: Option<CameraFrame>,
    pub(super) at: Option<Instant>,
}

impl LatestImage {
    /// The newest frame if it is no older than `max_age`.
    pub(super) fn fresh(&self, now: Instant, max_age: Duration) -> Option<CameraFrame> {
        let at = self.at?;
        if now.duration_since(at) > max_age {
            return None;
        }
        self.frame.clone()
    }
}

pub(super) fn respond_start(
    req: ServiceRequest<StartEpisode::Service>,
    success: bool,
    message: String,
    episode_name: String,
) {
    let response = StartEpisode::Response {
        success,
        message,
        episode_name,
    };
    if let Err(e) = req.respond(response) {
        warn!("start_episode: cannot respond: {e}");
    }
}

/// Logs a dead writer thread and shows it on the status; returns the message.
pub(super) fn writer_stopped(e: &WriterStopped, status: &mut RecordingStatus) -> String {
    let message = format!("{e}; restart recorder_node to record again");
    error!("{message}");
    status.last_error = message.clone();
    message
}

/// Queues the step's frame (none yet: the episode_start waits for the first image).
pub(super) fn record(
    sink: &mut RecordingSink,
    rec: &mut Option<Recording>,
    status: &mut RecordingStatus,
    frame: Option<CameraFrame>,
    (action, event): Step,
) {
    let (Some(r), Some(frame)) = (rec.as_mut(), frame) else {
        return;
    };
    r.needs_first_frame = false;
    match sink.push(frame, action, event) {
        Ok(true) => r.frames_queued += 1,
        Ok(false) => {}
        Err(e) => {
            writer_stopped(&e, status);
            if let Some(pending) = rec.take().and_then(|r| r.pending) {
                respond_start(pending, false, status.last_error.clone(), String::new());
            }
        }
    }
}

pub(super) fn on_sink_event(
    event: SinkEvent,
    rec: &mut Option<Recording>,
    saving: &mut Option<String>,
    status: &mut RecordingStatus,
    sampler: &mut Sampler,
) {
    let current = |rec: &mut Option<Recording>, name: &str| {
        rec.as_mut()
            .filter(|r| r.name == name)
            .and_then(|r| r.pending.take())
    };
    match event {
        SinkEvent::Started { name } => {
            if let Some(req) = current(rec, &name) {
                respond_start(req, true, format!("recording {name}"), name);
            }
        }
        SinkEvent::StartFailed { name, message } => {
            error!("cannot record {name}: {message}");
            status.last_error = message.clone();
            if let Some(req) = current(rec, &name) {
                respond_start(req, false, message, name);
                *rec = None;
                sampler.stop();
            }
        }
        SinkEvent::Progress { frames, .. } => {
            status.frames = u32::try_from(frames).unwrap_or(u32::MAX)
        }
        SinkEvent::Saved { path, frames } => {
            info!("saved {} ({frames} frames)", path.display());
            status.episodes_saved += 1;
            status.last_saved_path = path.display().to_string();
            *saving = None;
        }
        SinkEvent::Discarded { name, reason } => {
            info!("{name} not saved: {reason}");
            *saving = None;
        }
        SinkEvent::Error { message } => {
            error!("{message}");
            status.last_error = message;
            // A failed finish ends the saving too.
            *saving = None;
        }
    }
}

pub(super) fn publish_status(
    h: &NodeHandle<RecorderParams>,
    publisher: &r2r::Publisher<RecordingStatus>,
    status: &mut RecordingStatus,
    sink: &RecordingSink,
    rec: Option<&Recording>,
    saving: Option<&str>,
    now: Instant,
) {
    status.frames_dropped = u32::try_from(sink.dropped()).unwrap_or(u32::MAX);
    match (rec, saving) {
        (Some(r), _) => {
            status.state = RecordingStatus::RECORDING as u8;
            status.episode_name = r.name.clone();
            status.instruction = r.instruction.clone();
            status.duration_s = now.duration_since(r.started).as_secs_f32();
        }
        (None, Some(name)) => {
            status.state = RecordingStatus::SAVING as u8;
            status.episode_name = name.to_string();
        }
        (None, None) => {
            status.state = RecordingStatus::IDLE as u8;
            status.episode_name.clear();
            status.instruction.clear();
            status.frames = 0;
            status.duration_s = 0.0;
        }
    }
    status.header = Header {
        stamp: h.now(),
        frame_id: String::new(),
    };
    if let Err(e) = publisher.publish(status) {
        warn!("cannot publish status: {e}");
    }
}
