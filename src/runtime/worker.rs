//! The inference thread: runs [`Policy::step`] on the newest camera frame only, and swaps in a
//! new model between steps.
//!
//! Frames are handed over through a one-frame slot, not a queue: a frame that arrives while the
//! policy is busy replaces the waiting one, so the policy never works through stale images and
//! the caller never blocks. Results come back through a callback (the node forwards them to its
//! event loop). Model loads run on a thread of their own so the old model keeps driving
//! meanwhile.

use crate::data::image::ChannelOrder;
use crate::data::recording::CameraFrame;
use crate::model::WeightFormat;
use crate::model::{ActionChunk, ActionSpec, LoadOptions, Policy};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// One frame to run the policy on.
#[derive(Debug, Clone)]
pub struct Job {
    pub frame: CameraFrame,
    /// The image's stamp [s], carried through to the result.
    pub stamp: f64,
    pub instruction: String,
    /// Forget the history first (`~/reset`, a long image gap).
    pub reset: bool,
    /// The caller's generation: results of an older one are stale (new instruction, watchdog).
    pub epoch: u64,
    /// When the frame arrived.
    pub received: Instant,
}

/// What the worker reports.
#[derive(Debug)]
pub enum Event {
    Chunk {
        job_stamp: f64,
        epoch: u64,
        received: Instant,
        chunk: ActionChunk,
        /// Time inside `Policy::step`.
        step_time: Duration,
    },
    Failed {
        epoch: u64,
        message: String,
    },
    /// A model finished loading: swapped in (`Ok(dir)`) or rejected (`Err(reason)`).
    Loaded {
        request: u64,
        result: Result<PathBuf, String>,
    },
}

#[derive(Default)]
struct Slot {
    job: Option<Job>,
    model: Option<(u64, PathBuf, Box<Policy>)>,
    /// Since when the worker is inside a step.
    busy_since: Option<Instant>,
    stop: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
}

fn lock(s: &Shared) -> MutexGuard<'_, Slot> {
    s.slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Numeric set-up of a served model: `f32` or `i16` packed weights.
pub fn load_options(dtype: &str) -> Result<LoadOptions, String> {
    let format = match dtype {
        "f32" => WeightFormat::F32,
        "i16" => WeightFormat::I16,
        other => return Err(format!("`dtype` is `{other}`: use f32 or i16")),
    };
    Ok(LoadOptions {
        packing: Some(format),
        ..LoadOptions::default()
    })
}

/// Loads a model to serve; with `expected`, a model whose action layout differs (another width,
/// gripper or axis mapping) is refused: its outputs would mean other motions on this robot.
pub fn load(
    dir: &Path,
    opts: &LoadOptions,
    expected: Option<&ActionSpec>,
) -> Result<Policy, String> {
    let policy = Policy::load_with(dir, opts).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(want) = expected {
        let got = &policy.config().action;
        if (got.dim, got.gripper, got.robot_indices) != (want.dim, want.gripper, want.robot_indices)
        {
            return Err(format!(
                "{}: action layout (dim {}, gripper {}, robot_indices {:?}) differs from the served model's (dim {}, gripper {}, robot_indices {:?})",
                dir.display(), got.dim, got.gripper, got.robot_indices, want.dim, want.gripper, want.robot_indices
            ));
        }
    }
    Ok(policy)
}

/// Owns the inference thread. Dropping it stops the thread after its current step.
pub struct Worker {
    shared: Arc<Shared>,
    action: ActionSpec,
}

impl Worker {
    pub fn spawn(policy: Policy, report: impl Fn(Event) + Send + Sync + 'static) -> Self {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            wake: Condvar::new(),
        });
        let action = policy.config().action.clone();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || run(policy, &s, report))
            .expect("cannot start the inference thread");
        Self { shared, action }
    }

    /// Hands over the newest frame, replacing one still waiting. Never blocks on a step.
    pub fn submit(&self, job: Job) {
        lock(&self.shared).job = Some(job);
        self.shared.wake.notify_one();
    }

    /// Since when the current step runs, if one does.
    pub fn busy_since(&self) -> Option<Instant> {
        lock(&self.shared).busy_since
    }

    /// Whether a frame waits or a step runs.
    pub fn busy(&self) -> bool {
        let s = lock(&self.shared);
        s.busy_since.is_some() || s.job.is_some()
    }

    /// Loads `dir` on a thread of its own; on success the worker swaps it in before its next
    /// step (with an empty history). Either way an [`Event::Loaded`] reports it.
    pub fn load(
        &self,
        request: u64,
        dir: PathBuf,
        opts: LoadOptions,
        report: impl Fn(Event) + Send + 'static,
    ) {
        let shared = self.shared.clone();
        let expected = self.action.clone();
        std::thread::spawn(move || match load(&dir, &opts, Some(&expected)) {
            Ok(policy) => {
                lock(&shared).model = Some((request, dir, Box::new(policy)));
                shared.wake.notify_one();
            }
            Err(reason) => report(Event::Loaded {
                request,
                result: Err(reason),
            }),
        });
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.wake.notify_one();
    }
}

fn run(mut policy: Policy, shared: &Shared, report: impl Fn(Event)) {
    let mut instruction: Option<String> = None;
    loop {
        let (job, model) = {
            let mut s = lock(shared);
            while !s.stop && s.job.is_none() && s.model.is_none() {
                s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.stop {
                return;
            }
            let model = s.model.take();
            let job = if model.is_none() { s.job.take() } else { None };
            if job.is_some() {
                s.busy_since = Some(Instant::now());
            }
            (job, model)
        };
        if let Some((request, dir, new)) = model {
            policy = *new;
            instruction = None;
            info!("now serving {}", dir.display());
            report(Event::Loaded {
                request,
                result: Ok(dir),
            });
            continue;
        }
        let Some(job) = job else { continue };
        // RoboVLMs keeps one history per episode: a new instruction starts a new one.
        if job.reset || instruction.as_deref() != Some(job.instruction.as_str()) {
            policy.reset();
            instruction = Some(job.instruction.clone());
        }
        let started = Instant::now();
        let result = job
            .frame
            .to_stored(ChannelOrder::Rgb)
            .map_err(|e| format!("camera frame: {e}"))
            .and_then(|image| {
                policy
                    .step(&image, &job.instruction)
                    .map_err(|e| e.to_string())
            });
        lock(shared).busy_since = None;
        report(match result {
            Ok(chunk) => Event::Chunk {
                job_stamp: job.stamp,
                epoch: job.epoch,
                received: job.received,
                chunk,
                step_time: started.elapsed(),
            },
            Err(message) => {
                warn!("inference failed: {message}");
                Event::Failed {
                    epoch: job.epoch,
                    message,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::RawImage;
    use std::sync::mpsc;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/policy/native")
    }

    fn frame(seed: u8) -> CameraFrame {
        let (w, h) = (8u32, 6u32);
        CameraFrame::Raw(RawImage {
            width: w,
            height: h,
            encoding: "rgb8".into(),
            is_bigendian: false,
            step: w * 3,
            data: (0..w * h * 3)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect(),
        })
    }

    fn job(seed: u8, epoch: u64, instruction: &str) -> Job {
        Job {
            frame: frame(seed),
            stamp: f64::from(seed),
            instruction: instruction.into(),
            reset: false,
            epoch,
            received: Instant::now(),
        }
    }

    #[test]
    fn steps_match_the_library_and_reloads_swap_between_steps() {
        let opts = load_options("f32").unwrap();
        let mut reference = load(&fixture(), &opts, None).unwrap();
        let (tx, rx) = mpsc::channel();
        let report = move |e: Event| tx.send(e).unwrap();
        let worker = Worker::spawn(load(&fixture(), &opts, None).unwrap(), report.clone());
        let next = || rx.recv_timeout(Duration::from_secs(60)).unwrap();
        for seed in [3, 5] {
            worker.submit(job(seed, 1, "go"));
            let Event::Chunk {
                chunk, job_stamp, ..
            } = next()
            else {
                panic!("no chunk")
            };
            let image = frame(seed).to_stored(ChannelOrder::Rgb).unwrap();
            assert_eq!(
                chunk,
                reference.step(&image, "go").unwrap(),
                "same history, same chunk"
            );
            assert_eq!(job_stamp, f64::from(seed));
        }
        // A corrupt directory is refused; the old model keeps serving.
        let bad = tempfile::tempdir().unwrap();
        worker.load(7, bad.path().to_path_buf(), opts.clone(), report.clone());
        let Event::Loaded {
            request: 7,
            result: Err(reason),
        } = next()
        else {
            panic!("not refused")
        };
        assert!(
            reason.contains(&bad.path().display().to_string()),
            "{reason}"
        );
        worker.submit(job(4, 1, "go"));
        assert!(matches!(next(), Event::Chunk { .. }));
        // A good one is swapped in with a fresh history.
        worker.load(8, fixture(), opts, report);
        let Event::Loaded {
            request: 8,
            result: Ok(_),
        } = next()
        else {
            panic!("not loaded")
        };
        worker.submit(job(9, 2, "go"));
        let Event::Chunk {
            chunk, epoch: 2, ..
        } = next()
        else {
            panic!("no chunk")
        };
        reference.reset();
        let image = frame(9).to_stored(ChannelOrder::Rgb).unwrap();
        assert_eq!(chunk, reference.step(&image, "go").unwrap());
        // A frame that cannot be decoded fails the step, not the thread.
        let mut broken = job(1, 3, "go");
        broken.frame = CameraFrame::Compressed {
            format: "png".into(),
            data: vec![1, 2, 3],
        };
        worker.submit(broken);
        assert!(matches!(next(), Event::Failed { epoch: 3, .. }));
        assert!(load_options("f16").unwrap_err().contains("dtype"));
    }
}
