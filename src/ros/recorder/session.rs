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
    /// The `episode_start` step, until an image arrives for it.
    pub(super) first: Option<Step>,
    /// Steps made while no fresh image was there (the camera lags the teleop, or the first
    /// frame has not come yet): the next frame takes them, in order, so a key press is not lost.
    pub(super) waiting: Vec<(Instant, Step)>,
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

/// Steps that may wait for an image; beyond this the camera is considered gone.
const MAX_WAITING: usize = 64;

/// A step at `now`: recorded with the newest image if it is fresh and no earlier step is still
/// waiting (steps keep their order), otherwise kept for the next frame.
pub(super) fn step(
    sink: &mut RecordingSink,
    rec: &mut Option<Recording>,
    status: &mut RecordingStatus,
    latest: &LatestImage,
    max_age: Duration,
    now: Instant,
    step: Step,
) -> u64 {
    let Some(r) = rec.as_mut() else { return 0 };
    if r.first.is_none() && r.waiting.is_empty() {
        if let Some(frame) = latest.fresh(now, max_age) {
            record(sink, rec, status, Some(frame), step);
            return 0;
        }
    }
    r.waiting.push((now, step));
    if r.waiting.len() > MAX_WAITING {
        r.waiting.remove(0);
        warn!("step skipped: {MAX_WAITING} steps are waiting for a camera frame");
        return 1;
    }
    0
}

/// A camera frame arrived at `now`: it is the episode's first frame if that is still missing,
/// and the frame of every waiting step no older than `max_age`. Returns the steps skipped.
pub(super) fn take_waiting(
    sink: &mut RecordingSink,
    rec: &mut Option<Recording>,
    status: &mut RecordingStatus,
    frame: &CameraFrame,
    max_age: Duration,
    now: Instant,
) -> u64 {
    let Some(r) = rec.as_mut() else { return 0 };
    let first = r.first.take();
    let waiting = std::mem::take(&mut r.waiting);
    let mut skipped = 0;
    for (at, s) in first.map(|s| (now, s)).into_iter().chain(waiting) {
        if now.duration_since(at) > max_age {
            skipped += 1;
            warn!("step skipped: no camera frame within {max_age:?} of it");
        } else {
            record(sink, rec, status, Some(frame.clone()), s);
        }
    }
    skipped
}

/// Steps still waiting for a frame when the episode ends; they have none.
pub(super) fn drop_waiting(r: &Recording) -> u64 {
    if !r.waiting.is_empty() {
        warn!(
            "{}: {} step(s) at the end had no camera frame",
            r.name,
            r.waiting.len()
        );
    }
    r.waiting.len() as u64
}

/// Queues the step's frame.
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

/// Ends the episode in progress and has the writer save it, as `~/stop_episode` does; the idle
/// timeout, deactivate and shutdown end an episode the same way, so none loses recorded data.
/// `why` answers a start request still waiting for the writer. `None` when nothing was recorded.
pub(super) fn save_episode(
    rec: &mut Option<Recording>,
    sink: &RecordingSink,
    sampler: &mut Sampler,
    saving: &mut Option<String>,
    status: &mut RecordingStatus,
    skipped: &mut u64,
    why: &str,
) -> Option<Result<String, String>> {
    let r = rec.take()?;
    *skipped += drop_waiting(&r);
    sampler.stop();
    if let Some(pending) = r.pending {
        respond_start(pending, false, why.to_string(), r.name.clone());
    }
    let d = r.started.elapsed().as_secs_f64();
    Some(match sink.finish(d) {
        Ok(()) => {
            info!(
                "stopping {} after {d:.1} s ({} frames queued)",
                r.name, r.frames_queued
            );
            *saving = Some(r.name.clone());
            Ok(format!("saving {} ({} frames)", r.name, r.frames_queued))
        }
        Err(e) => Err(writer_stopped(&e, status)),
    })
}

pub(super) fn publish_status(
    h: &NodeHandle<RecorderParams>,
    publisher: &r2r::Publisher<RecordingStatus>,
    status: &mut RecordingStatus,
    sink: Option<&RecordingSink>,
    rec: Option<&Recording>,
    saving: Option<&str>,
    now: Instant,
) {
    // Without a writer (not configured) the last count stays.
    if let Some(sink) = sink {
        status.frames_dropped = u32::try_from(sink.dropped()).unwrap_or(u32::MAX);
    }
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
