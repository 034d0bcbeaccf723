//! Live recording, without ROS: which steps to record ([`Sampler`]) and a writer thread
//! that turns camera frames into episodes off the subscriber's path ([`RecordingSink`]).
//! `recorder_node` wires both to topics and services.

use crate::data::episode::{Action, EpisodeError, EpisodeWriter, EventType, WriteOptions};
use crate::data::image::{self, ChannelOrder, Encoding, RawImage};
use ::image::RgbImage;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Instant;

/// A camera frame as it came off the wire; decoded on the writer thread.
#[derive(Debug, Clone)]
pub enum CameraFrame {
    Raw(RawImage),
    Compressed { format: String, data: Vec<u8> },
}

impl CameraFrame {
    /// H×W×3 bytes in `order`, as an episode stores them. A `bgr8`/`rgb8` image without row
    /// padding whose order already matches is taken as is (the 30 Hz HD case).
    pub fn to_stored(self, order: ChannelOrder) -> image::Result<RgbImage> {
        let raw = match self {
            CameraFrame::Raw(raw) => raw,
            CameraFrame::Compressed { format, data } => {
                return Ok(image::to_interleaved(
                    &image::decode_compressed(&format, &data)?,
                    order,
                ))
            }
        };
        let encoding = image::validate(&raw.as_ref())?;
        let native = match encoding {
            Encoding::Bgr8 => Some(ChannelOrder::Bgr),
            Encoding::Rgb8 => Some(ChannelOrder::Rgb),
            _ => None,
        };
        if native == Some(order) && raw.step == raw.width * 3 {
            let (w, h, len) = (raw.width, raw.height, raw.data.len());
            return RgbImage::from_raw(w, h, raw.data).ok_or(image::ImageError::DataLength {
                len,
                step: w * 3,
                height: h,
                expected: u64::from(w) * 3 * u64::from(h),
            });
        }
        Ok(image::to_interleaved(&image::decode(&raw.as_ref())?, order))
    }
}

/// How steps are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleMode {
    /// One frame per discrete command change, as the fork's keyboard collector records.
    Event,
    /// A frame at a fixed rate: latest image + latest command.
    Rate,
}

impl std::str::FromStr for SampleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "event" => Ok(SampleMode::Event),
            "rate" => Ok(SampleMode::Rate),
            other => Err(format!(
                "unknown mode `{other}`: expected `event` or `rate`"
            )),
        }
    }
}

/// Commands whose components all lie within this of zero count as "stopped".
const ZERO_EPS: f32 = 1e-4;

fn is_zero(a: &Action) -> bool {
    a.iter().all(|v| v.abs() < ZERO_EPS)
}

/// Decides which steps of a live stream become episode frames.
#[derive(Debug)]
pub struct Sampler {
    mode: SampleMode,
    last_cmd: Action,
    last_cmd_at: Option<Instant>,
    /// A command older than this counts as zero in rate mode (the teleop went silent).
    cmd_timeout_s: f64,
}

impl Sampler {
    pub fn new(mode: SampleMode, cmd_timeout_s: f64) -> Self {
        Self {
            mode,
            last_cmd: [0.0; 3],
            last_cmd_at: None,
            cmd_timeout_s,
        }
    }

    /// Forgets the previous command (a new episode starts from rest).
    pub fn reset(&mut self) {
        self.last_cmd = [0.0; 3];
        self.last_cmd_at = None;
    }

    /// A command arrived. In event mode returns the step to record: a new non-zero
    /// command is a `start_action`, the return to zero a `stop_action`; repeats of the
    /// same command (teleop keeps publishing while a key is held) record nothing.
    pub fn on_command(&mut self, cmd: Action, now: Instant) -> Option<(Action, EventType)> {
        let changed = cmd
            .iter()
            .zip(&self.last_cmd)
            .any(|(a, b)| (a - b).abs() >= ZERO_EPS);
        self.last_cmd = cmd;
        self.last_cmd_at = Some(now);
        if self.mode != SampleMode::Event || !changed {
            return None;
        }
        Some(if is_zero(&cmd) {
            ([0.0; 3], EventType::StopAction)
        } else {
            (cmd, EventType::StartAction)
        })
    }

    /// A rate-mode tick: the step to record now.
    pub fn on_tick(&self, now: Instant) -> (Action, EventType) {
        let fresh = self
            .last_cmd_at
            .is_some_and(|t| now.duration_since(t).as_secs_f64() <= self.cmd_timeout_s);
        let cmd = if fresh { self.last_cmd } else { [0.0; 3] };
        if is_zero(&cmd) {
            ([0.0; 3], EventType::StopAction)
        } else {
            (cmd, EventType::StartAction)
        }
    }

    /// Seconds since the last non-silent command, for the idle timeout.
    pub fn idle_s(&self, now: Instant) -> Option<f64> {
        self.last_cmd_at
            .map(|t| now.duration_since(t).as_secs_f64())
    }
}

enum Job {
    Start {
        dir: PathBuf,
        name: String,
        opts: Box<WriteOptions>,
    },
    Frame {
        frame: CameraFrame,
        action: Action,
        event: EventType,
    },
    Finish {
        duration_s: f64,
    },
    Abort,
}

/// What the writer thread reports back.
#[derive(Debug)]
pub enum SinkEvent {
    Started {
        name: String,
    },
    /// Frames written so far in the current episode.
    Progress {
        name: String,
        frames: usize,
    },
    Saved {
        path: PathBuf,
        frames: usize,
    },
    Discarded {
        name: String,
        reason: String,
    },
    Error {
        message: String,
    },
}

/// Writes episodes on a thread of its own, fed through a bounded queue, so a slow disk
/// or compression never stalls the subscriber: when the queue is full the frame is
/// dropped and counted instead.
pub struct RecordingSink {
    tx: Option<SyncSender<Job>>,
    events: Receiver<SinkEvent>,
    thread: Option<JoinHandle<()>>,
    dropped: u64,
}

impl RecordingSink {
    /// `queue` frames may wait for the writer before new ones are dropped.
    pub fn spawn(queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let (etx, events) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("episode-writer".into())
            .spawn(move || writer_loop(rx, etx))
            .ok();
        Self {
            tx: Some(tx),
            events,
            thread,
            dropped: 0,
        }
    }

    /// Control messages (start/finish/abort) wait for room: they must not be lost.
    fn send_control(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    pub fn start(&self, dir: &Path, name: &str, opts: WriteOptions) -> bool {
        self.send_control(Job::Start {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            opts: Box::new(opts),
        })
    }

    /// Queues a frame; returns false (and counts a drop) when the writer is behind.
    pub fn push(&mut self, frame: CameraFrame, action: Action, event: EventType) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(Job::Frame {
            frame,
            action,
            event,
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped += 1;
                false
            }
        }
    }

    pub fn finish(&self, duration_s: f64) -> bool {
        self.send_control(Job::Finish { duration_s })
    }

    pub fn abort(&self) -> bool {
        self.send_control(Job::Abort)
    }

    /// Frames dropped because the writer was behind, since the sink started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events reported by the writer since the last call.
    pub fn poll(&self) -> Vec<SinkEvent> {
        self.events.try_iter().collect()
    }

    /// Finishes nothing: the caller decides (finish/abort) before closing. Waits for
    /// every queued job to be written, then joins the thread.
    pub fn close(mut self) -> Vec<SinkEvent> {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.poll()
    }
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(rx: Receiver<Job>, events: mpsc::Sender<SinkEvent>) {
    let mut current: Option<EpisodeWriter> = None;
    let report = |e: SinkEvent| {
        let _ = events.send(e);
    };
    let fail = |e: EpisodeError| {
        let _ = events.send(SinkEvent::Error {
            message: e.to_string(),
        });
    };
    for job in rx {
        match job {
            Job::Start { dir, name, opts } => {
                if let Some(w) = current.take() {
                    // A start without a stop: keep what was recorded rather than lose it.
                    let n = w.len();
                    match w.finish(0.0) {
                        Ok(path) => report(SinkEvent::Saved { path, frames: n }),
                        Err(e) => fail(e),
                    }
                }
                match EpisodeWriter::create(&dir, &name, *opts) {
                    Ok(w) => {
                        current = Some(w);
                        report(SinkEvent::Started { name });
                    }
                    Err(e) => fail(e),
                }
            }
            Job::Frame {
                frame,
                action,
                event,
            } => {
                let Some(w) = current.as_mut() else { continue };
                let stored = match frame.to_stored(w.channel_order()) {
                    Ok(img) => img,
                    Err(e) => {
                        report(SinkEvent::Error {
                            message: format!("frame {} of {} skipped: {e}", w.len(), w.name()),
                        });
                        continue;
                    }
                };
                match w.push(&stored, action, event) {
                    Ok(()) => report(SinkEvent::Progress {
                        name: w.name().to_string(),
                        frames: w.len(),
                    }),
                    Err(e) => fail(e),
                }
            }
            Job::Finish { duration_s } => {
                if let Some(w) = current.take() {
                    let (name, n) = (w.name().to_string(), w.len());
                    match w.finish(duration_s) {
                        Ok(path) => report(SinkEvent::Saved { path, frames: n }),
                        Err(EpisodeError::Empty { .. }) => report(SinkEvent::Discarded {
                            name,
                            reason: "no frames were recorded".into(),
                        }),
                        Err(e) => fail(e),
                    }
                }
            }
            Job::Abort => {
                if let Some(w) = current.take() {
                    let name = w.name().to_string();
                    w.abort();
                    report(SinkEvent::Discarded {
                        name,
                        reason: "discarded on request".into(),
                    });
                }
            }
        }
    }
    // Channel closed with an episode open (node shutting down): finish it, so a clean
    // shutdown never loses a recording.
    if let Some(w) = current.take() {
        let n = w.len();
        match w.finish(0.0) {
            Ok(path) => report(SinkEvent::Saved { path, frames: n }),
            Err(EpisodeError::Empty { .. }) => {}
            Err(e) => fail(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::episode::EpisodeReader;
    use std::time::Duration;

    #[test]
    fn event_mode_records_changes_only() {
        let t0 = Instant::now();
        let mut s = Sampler::new(SampleMode::Event, 0.5);
        assert_eq!(
            s.on_command([0.5, 0.0, 0.0], t0),
            Some(([0.5, 0.0, 0.0], EventType::StartAction))
        );
        assert_eq!(s.on_command([0.5, 0.0, 0.0], t0), None, "held key repeats");
        assert_eq!(
            s.on_command([0.0, 0.0, 0.0], t0),
            Some(([0.0; 3], EventType::StopAction))
        );
        assert_eq!(s.on_command([0.0, 0.0, 0.0], t0), None);
        assert_eq!(
            s.on_command([0.0, 0.0, 1.0], t0),
            Some(([0.0, 0.0, 1.0], EventType::StartAction))
        );
    }

    #[test]
    fn rate_mode_zeroes_stale_commands() {
        let t0 = Instant::now();
        let mut s = Sampler::new(SampleMode::Rate, 0.5);
        assert_eq!(s.on_command([0.3, 0.1, 0.0], t0), None);
        assert_eq!(
            s.on_tick(t0 + Duration::from_millis(100)),
            ([0.3, 0.1, 0.0], EventType::StartAction)
        );
        assert_eq!(
            s.on_tick(t0 + Duration::from_secs(1)),
            ([0.0; 3], EventType::StopAction)
        );
        assert!(s.idle_s(t0 + Duration::from_secs(2)).unwrap() >= 2.0);
    }

    #[test]
    fn bgr8_frames_are_stored_without_conversion_and_others_converted() {
        let raw = RawImage {
            width: 2,
            height: 1,
            encoding: "bgr8".into(),
            is_bigendian: false,
            step: 6,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let bgr = CameraFrame::Raw(raw.clone())
            .to_stored(ChannelOrder::Bgr)
            .unwrap();
        assert_eq!(bgr.as_raw(), &vec![1, 2, 3, 4, 5, 6]);
        let rgb = CameraFrame::Raw(raw).to_stored(ChannelOrder::Rgb).unwrap();
        assert_eq!(rgb.as_raw(), &vec![3, 2, 1, 6, 5, 4]);
        let mono = RawImage {
            width: 1,
            height: 1,
            encoding: "mono8".into(),
            is_bigendian: false,
            step: 1,
            data: vec![9],
        };
        let m = CameraFrame::Raw(mono).to_stored(ChannelOrder::Bgr).unwrap();
        assert_eq!(m.as_raw(), &vec![9, 9, 9]);
        let bad = RawImage {
            width: 4,
            height: 1,
            encoding: "bgr8".into(),
            is_bigendian: false,
            step: 2,
            data: vec![0; 2],
        };
        assert!(CameraFrame::Raw(bad).to_stored(ChannelOrder::Bgr).is_err());
    }

    #[test]
    fn sink_writes_episodes_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = RecordingSink::spawn(8);
        assert!(sink.start(dir.path(), "ep_a", WriteOptions::default()));
        for i in 0..3u8 {
            let raw = RawImage {
                width: 2,
                height: 2,
                encoding: "rgb8".into(),
                is_bigendian: false,
                step: 6,
                data: vec![i; 12],
            };
            let ev = if i == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            assert!(sink.push(CameraFrame::Raw(raw), [f32::from(i), 0.0, 0.0], ev));
        }
        assert!(sink.finish(1.5));
        // An empty episode is discarded, not saved.
        assert!(sink.start(dir.path(), "ep_empty", WriteOptions::default()));
        assert!(sink.finish(0.1));
        let events = sink.close();
        let saved: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SinkEvent::Saved { path, frames } => Some((path.clone(), *frames)),
                _ => None,
            })
            .collect();
        assert_eq!(saved.len(), 1, "{events:?}");
        assert_eq!(saved[0].1, 3);
        assert!(events
            .iter()
            .any(|e| matches!(e, SinkEvent::Discarded { name, .. } if name == "ep_empty")));
        let ep = EpisodeReader::open(&saved[0].0).unwrap();
        assert_eq!(ep.len(), 3);
        assert_eq!(ep.actions()[2], [2.0, 0.0, 0.0]);
        assert_eq!(ep.meta().total_duration, 1.5);
        assert!(!dir.path().join("ep_empty.h5").exists());
    }
}
