//! Live recording, without ROS: a writer thread that turns camera frames into episodes off the
//! subscriber's path ([`RecordingSink`]). Which steps to record is
//! [`crate::data::sampling::Sampler`]'s; `recorder_node` wires both to topics and services.

use crate::data::episode::{Action, EpisodeError, EpisodeWriter, EventType, WriteOptions};
use crate::data::image::{self, ChannelOrder, Encoding, RawImage};
use ::image::RgbImage;
use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
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

enum Job {
    Start {
        dir: PathBuf,
        name: String,
        opts: Box<WriteOptions>,
        requested: Instant,
    },
    Frame {
        frame: CameraFrame,
        action: Action,
        event: EventType,
    },
    /// `None`: the writer's own wall time since the episode started.
    Finish {
        duration_s: Option<f64>,
    },
    Abort,
}

/// What the writer thread reports back.
#[derive(Debug)]
pub enum SinkEvent {
    /// The episode's file is open: frames can be written.
    Started {
        name: String,
    },
    /// The episode's file could not be created; its frames are dropped.
    StartFailed {
        name: String,
        message: String,
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

/// The writer thread is gone (it panicked or could not start): nothing more will be written.
#[derive(Debug, thiserror::Error)]
#[error("the episode writer thread has stopped{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
pub struct WriterStopped {
    /// The panic message, once known (after [`RecordingSink::close`]).
    pub reason: Option<String>,
}

/// The writer's reports, for an async consumer (a `Stream`) or [`drain`]ed.
pub type SinkEvents = UnboundedReceiver<SinkEvent>;

/// The events available now, without waiting.
pub fn drain(events: &mut SinkEvents) -> Vec<SinkEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

/// Writes episodes on a thread of its own. Nothing here blocks: frames are counted into a
/// bounded budget (a frame over it is dropped and counted, so a slow disk or compression never
/// stalls the subscriber), and control messages (start/finish/abort) always go through, in
/// order with the frames, since they share one unbounded channel.
pub struct RecordingSink {
    tx: Option<Sender<Job>>,
    /// Frames sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    thread: Option<JoinHandle<()>>,
    dropped: u64,
}

impl RecordingSink {
    /// `queue` frames may wait for the writer before new ones are dropped. Returns the sink and
    /// the stream of its writer's reports.
    pub fn spawn(queue: usize) -> std::io::Result<(Self, SinkEvents)> {
        let (tx, rx) = mpsc::channel();
        let (etx, events) = unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&queued);
        let thread = std::thread::Builder::new()
            .name("episode-writer".into())
            .spawn(move || writer_loop(rx, etx, &taken))?;
        let sink = Self {
            tx: Some(tx),
            queued,
            capacity: queue.max(1),
            thread: Some(thread),
            dropped: 0,
        };
        Ok((sink, events))
    }

    fn send(&self, job: Job) -> Result<(), WriterStopped> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|_| WriterStopped { reason: None }),
            None => Err(WriterStopped { reason: None }),
        }
    }

    /// Opens a new episode (finishing one left open); the outcome comes as
    /// [`SinkEvent::Started`] or [`SinkEvent::StartFailed`].
    pub fn start(&self, dir: &Path, name: &str, opts: WriteOptions) -> Result<(), WriterStopped> {
        self.send(Job::Start {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            opts: Box::new(opts),
            requested: Instant::now(),
        })
    }

    /// Queues a frame: `Ok(false)` (and a counted drop) when the writer is behind.
    pub fn push(
        &mut self,
        frame: CameraFrame,
        action: Action,
        event: EventType,
    ) -> Result<bool, WriterStopped> {
        if self.queued.load(Ordering::Acquire) >= self.capacity {
            self.dropped += 1;
            return Ok(false);
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.send(Job::Frame {
            frame,
            action,
            event,
        });
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        sent.map(|()| true)
    }

    /// Saves the current episode with `duration_s` as its `total_duration`.
    pub fn finish(&self, duration_s: f64) -> Result<(), WriterStopped> {
        self.send(Job::Finish {
            duration_s: Some(duration_s),
        })
    }

    pub fn abort(&self) -> Result<(), WriterStopped> {
        self.send(Job::Abort)
    }

    /// Frames dropped because the writer was behind, since the sink started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Finishes nothing: the caller decides (finish/abort) before closing; an episode still
    /// open is saved with the writer's wall time as its duration. Waits for every queued job
    /// to be written, then joins the thread; a writer that panicked is the error.
    pub fn close(mut self) -> Result<(), WriterStopped> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => Err(WriterStopped {
                reason: Some(panic_message(panic.as_ref())),
            }),
            _ => Ok(()),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "it panicked".into())
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(rx: Receiver<Job>, events: UnboundedSender<SinkEvent>, queued: &AtomicUsize) {
    let mut current: Option<EpisodeWriter> = None;
    let report = |e: SinkEvent| {
        // The receiver gone means nobody listens any more; the episode is still written.
        let _ = events.unbounded_send(e);
    };
    let finish = |w: EpisodeWriter, duration_s: Option<f64>| {
        let (name, n) = (w.name().to_string(), w.len());
        let duration_s = duration_s.unwrap_or_else(|| w.elapsed_s());
        match w.finish(duration_s) {
            Ok(path) => report(SinkEvent::Saved { path, frames: n }),
            Err(EpisodeError::Empty { .. }) => report(SinkEvent::Discarded {
                name,
                reason: "no frames were recorded".into(),
            }),
            Err(e) => report(SinkEvent::Error {
                message: e.to_string(),
            }),
        }
    };
    for job in rx {
        match job {
            Job::Start {
                dir,
                name,
                opts,
                requested,
            } => {
                if let Some(w) = current.take() {
                    // A start without a stop: keep what was recorded rather than lose it.
                    finish(w, None);
                }
                match EpisodeWriter::create(&dir, &name, *opts) {
                    Ok(mut w) => {
                        w.started_at(requested);
                        current = Some(w);
                        report(SinkEvent::Started { name });
                    }
                    Err(e) => report(SinkEvent::StartFailed {
                        name,
                        message: e.to_string(),
                    }),
                }
            }
            Job::Frame {
                frame,
                action,
                event,
            } => {
                queued.fetch_sub(1, Ordering::AcqRel);
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
                    Err(e) => report(SinkEvent::Error {
                        message: e.to_string(),
                    }),
                }
            }
            Job::Finish { duration_s } => {
                if let Some(w) = current.take() {
                    finish(w, duration_s);
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
        finish(w, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::episode::EpisodeReader;
    use std::time::Duration;

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

    fn raw_frame(i: u8) -> CameraFrame {
        CameraFrame::Raw(RawImage {
            width: 2,
            height: 2,
            encoding: "rgb8".into(),
            is_bigendian: false,
            step: 6,
            data: vec![i; 12],
        })
    }

    fn saved(events: &[SinkEvent]) -> Vec<(PathBuf, usize)> {
        events
            .iter()
            .filter_map(|e| match e {
                SinkEvent::Saved { path, frames } => Some((path.clone(), *frames)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn sink_writes_episodes_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, mut events) = RecordingSink::spawn(8).unwrap();
        sink.start(dir.path(), "ep_a", WriteOptions::default())
            .unwrap();
        for i in 0..3u8 {
            let ev = if i == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            assert!(sink
                .push(raw_frame(i), [f32::from(i), 0.0, 0.0], ev)
                .unwrap());
        }
        sink.finish(1.5).unwrap();
        // An empty episode is discarded, not saved; a name taken fails to start.
        sink.start(dir.path(), "ep_empty", WriteOptions::default())
            .unwrap();
        sink.finish(0.1).unwrap();
        sink.start(dir.path(), "ep_a", WriteOptions::default())
            .unwrap();
        sink.close().unwrap();
        let events = drain(&mut events);
        let saved = saved(&events);
        assert_eq!(saved.len(), 1, "{events:?}");
        assert_eq!(saved[0].1, 3);
        assert!(events
            .iter()
            .any(|e| matches!(e, SinkEvent::Discarded { name, .. } if name == "ep_empty")));
        assert!(
            events.iter().any(
                |e| matches!(e, SinkEvent::StartFailed { name, message } if name == "ep_a" && message.contains("already exists"))
            ),
            "{events:?}"
        );
        let ep = EpisodeReader::open(&saved[0].0).unwrap();
        assert_eq!(ep.len(), 3);
        assert_eq!(ep.actions()[2], [2.0, 0.0, 0.0]);
        assert_eq!(ep.meta().total_duration, 1.5);
        assert!(!dir.path().join("ep_empty.h5").exists());
    }

    /// Fails before the fix: start/finish/abort used a blocking send, so with the frame queue
    /// full and the writer stuck (here: waiting for the HDF5 lock this test holds) they hung.
    #[test]
    fn control_messages_never_wait_for_a_full_frame_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let (done_tx, done) = mpsc::channel();
        let worker = hdf5::sync::sync(|| {
            let worker = std::thread::spawn(move || {
                let (mut sink, events) = RecordingSink::spawn(2).unwrap();
                sink.start(&path, "busy", WriteOptions::default()).unwrap();
                let queued: Vec<bool> = (0..6u8)
                    .map(|i| {
                        sink.push(raw_frame(i), [0.0; 3], EventType::StartAction)
                            .unwrap()
                    })
                    .collect();
                sink.finish(1.0).unwrap();
                sink.abort().unwrap();
                sink.start(&path, "next", WriteOptions::default()).unwrap();
                sink.finish(1.0).unwrap();
                done_tx.send(queued).unwrap();
                (sink, events)
            });
            let queued = done.recv_timeout(Duration::from_secs(10));
            assert!(
                queued.is_ok(),
                "control calls blocked behind the full frame queue"
            );
            assert_eq!(queued.unwrap(), [true, true, false, false, false, false]);
            worker
        });
        let (sink, mut events) = worker.join().unwrap();
        assert_eq!(sink.dropped(), 4);
        sink.close().unwrap();
        let saved = saved(&drain(&mut events));
        assert_eq!(saved.len(), 1, "the 2 queued frames, then an empty episode");
        assert_eq!(saved[0].1, 2);
    }

    /// Fails before the fix: frames sent to a dead writer were counted as dropped, not an error.
    #[test]
    fn a_dead_writer_thread_is_an_error() {
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let mut sink = RecordingSink {
            tx: Some(tx),
            queued: Arc::default(),
            capacity: 4,
            thread: Some(std::thread::spawn(|| panic!("disk on fire"))),
            dropped: 0,
        };
        assert!(sink
            .push(raw_frame(0), [0.0; 3], EventType::StartAction)
            .is_err());
        assert!(sink.finish(1.0).is_err());
        assert_eq!(sink.dropped(), 0);
        let err = sink.close().unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    /// Fails before the fix: an episode left open at shutdown was saved with duration 0.
    #[test]
    fn an_episode_saved_at_close_keeps_its_wall_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, mut events) = RecordingSink::spawn(8).unwrap();
        sink.start(dir.path(), "open", WriteOptions::default())
            .unwrap();
        sink.push(raw_frame(0), [0.0; 3], EventType::EpisodeStart)
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // A second start saves the open one the same way.
        sink.start(dir.path(), "open2", WriteOptions::default())
            .unwrap();
        sink.push(raw_frame(1), [0.0; 3], EventType::EpisodeStart)
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        sink.close().unwrap();
        let saved = saved(&drain(&mut events));
        assert_eq!(saved.len(), 2);
        for (path, _) in saved {
            let d = EpisodeReader::open(&path).unwrap().meta().total_duration;
            // The clock starts at `start`, however late the busy writer opens the file.
            assert!(d >= 0.15, "{}: total_duration {d}", path.display());
        }
    }
}
