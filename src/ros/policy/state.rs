//! policy_node's running state and what each input does to it: frames go to the inference
//! worker, finished chunks to the executor, and each control period asks for a command.

use super::params::{PolicyParams, NAME};
use crate::data::recording::CameraFrame;
use crate::ros::convert::action_to_twist;
use crate::ros::lifecycle::Transition;
use crate::runtime::worker::{self, Event, Job, Worker};
use crate::runtime::{ChunkExecutor, Gate, HoldReason, SafetyFilter, TimedChunk};
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::mobile_vla::msg::ActionChunk as ChunkMsg;
use r2r::mobile_vla::srv::LoadModel;
use r2r::std_msgs::msg::Header;
use r2r::ServiceRequest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Everything that changes while the node runs.
pub(super) struct State {
    pub(super) params: PolicyParams,
    pub(super) start: Instant,
    pub(super) worker: Option<Worker>,
    pub(super) model_dir: PathBuf,
    pub(super) active: bool,
    pub(super) gate: Gate,
    pub(super) executor: ChunkExecutor,
    pub(super) filter: SafetyFilter,
    /// Results of older epochs are dropped (new instruction, reset, watchdog, model swap).
    pub(super) epoch: u64,
    pub(super) instruction: String,
    pub(super) reset_next: bool,
    pub(super) last_image: Option<Instant>,
    pub(super) watchdog_tripped: bool,
    pub(super) last_step_ms: f64,
    pub(super) stale_chunks: u64,
    pub(super) hold: Option<HoldReason>,
    pub(super) last_error: String,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) loads: HashMap<u64, Option<ServiceRequest<LoadModel::Service>>>,
    pub(super) next_load: u64,
}

impl State {
    pub(super) fn mono(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub(super) fn reporter(&self) -> impl Fn(Event) + Send + Sync + Clone + 'static {
        let tx = self.events.clone();
        move |e| {
            // Gone only at shutdown.
            let _ = tx.send(e);
        }
    }

    /// Drops every held chunk and any inference in flight: nothing drives until a fresh one.
    pub(super) fn invalidate(&mut self) {
        self.epoch += 1;
        self.executor.clear();
    }

    pub(super) async fn transition(&mut self, t: Transition) -> Result<(), String> {
        match t {
            Transition::Configure => {
                let dir = PathBuf::from(&self.params.model_dir);
                let opts = worker::load_options(&self.params.dtype)?;
                let d = dir.clone();
                let policy = tokio::task::spawn_blocking(move || worker::load(&d, &opts, None))
                    .await
                    .map_err(|e| format!("model loading stopped: {e}"))??;
                info!("loaded {} ({})", dir.display(), self.params.dtype);
                self.worker = Some(Worker::spawn(policy, self.reporter()));
                self.model_dir = dir;
            }
            Transition::Activate => {
                self.active = true;
                self.gate.enabled = true;
                self.invalidate();
            }
            Transition::Deactivate => self.active = false,
            Transition::Cleanup | Transition::Shutdown => {
                self.active = false;
                self.worker = None;
            }
        }
        Ok(())
    }

    pub(super) fn on_image(&mut self, frame: CameraFrame, stamp: f64, now_ros: f64) {
        let now = Instant::now();
        if self
            .last_image
            .is_some_and(|t| now.duration_since(t).as_secs_f64() > self.params.history_reset_s)
        {
            self.reset_next = true;
        }
        self.last_image = Some(now);
        self.gate.image(self.mono());
        if self.watchdog_tripped {
            self.watchdog_tripped = false;
            info!("images are back: driving again after the next inference");
        }
        let Some(worker) = self
            .worker
            .as_ref()
            .filter(|_| self.active && self.gate.enabled)
        else {
            return;
        };
        if self.instruction.trim().is_empty() || !self.executor.wants_plan(now_ros) {
            return;
        }
        // An unstamped camera: the frame is as old as its arrival.
        let stamp = if stamp > 0.0 { stamp } else { now_ros };
        worker.submit(Job {
            frame,
            stamp,
            instruction: self.instruction.clone(),
            reset: std::mem::take(&mut self.reset_next),
            epoch: self.epoch,
            received: now,
        });
    }

    pub(super) fn on_instruction(&mut self, text: String) {
        if text != self.instruction {
            info!("new instruction: \"{text}\"");
            self.instruction = text;
            self.invalidate();
        }
    }

    /// A finished inference: `Some(chunk message)` to publish when it is current.
    pub(super) fn on_result(&mut self, event: Event, now_ros: f64) -> Option<ChunkMsg> {
        match event {
            Event::Chunk {
                job_stamp,
                epoch,
                received,
                chunk,
                step_time,
            } => {
                self.last_step_ms = step_time.as_secs_f64() * 1e3;
                if epoch != self.epoch {
                    return None;
                }
                let age = received.elapsed().as_secs_f64();
                if age > self.params.max_inference_s {
                    warn!(
                        "dropping a chunk {age:.2} s after its image (max_inference_s {})",
                        self.params.max_inference_s
                    );
                    return None;
                }
                self.gate.inference_failed = false;
                let timed = TimedChunk {
                    stamp: job_stamp,
                    dt: f64::from(chunk.dt),
                    actions: chunk.actions.clone(),
                };
                if !self.executor.push(timed, now_ros) {
                    self.stale_chunks += 1;
                    warn!(
                        "chunk already over when it arrived ({:.0} ms step): holding zero",
                        self.last_step_ms
                    );
                }
                let (sec, nanosec) = split_secs(job_stamp);
                Some(ChunkMsg {
                    header: Header {
                        stamp: r2r::builtin_interfaces::msg::Time { sec, nanosec },
                        frame_id: self.params.frame_id.clone(),
                    },
                    actions: chunk.actions.iter().map(|&a| action_to_twist(a)).collect(),
                    dt: chunk.dt,
                })
            }
            Event::Failed { epoch, message } => {
                if epoch == self.epoch {
                    self.gate.inference_failed = true;
                    self.executor.clear();
                    self.last_error = message;
                }
                None
            }
            Event::Loaded { request, result } => {
                let (success, message) = match result {
                    Ok(dir) => {
                        let m = format!("now serving {}", dir.display());
                        self.model_dir = dir;
                        self.invalidate();
                        (true, m)
                    }
                    Err(reason) => {
                        warn!("model rejected, the old one keeps driving: {reason}");
                        self.last_error = reason.clone();
                        (false, reason)
                    }
                };
                if let Some(Some(req)) = self.loads.remove(&request) {
                    if let Err(e) = req.respond(LoadModel::Response { success, message }) {
                        warn!("load_model: cannot respond: {e}");
                    }
                }
                None
            }
        }
    }

    /// Starts loading `dir`; `req` is answered when it is done.
    pub(super) fn load(&mut self, dir: String, req: Option<ServiceRequest<LoadModel::Service>>) {
        let refuse = |req: Option<ServiceRequest<LoadModel::Service>>, message: String| {
            warn!("load_model: {message}");
            if let Some(req) = req {
                if let Err(e) = req.respond(LoadModel::Response {
                    success: false,
                    message,
                }) {
                    warn!("load_model: cannot respond: {e}");
                }
            }
        };
        let Some(worker) = &self.worker else {
            return refuse(req, "no model is loaded: configure the node first".into());
        };
        if !self.loads.is_empty() {
            return refuse(req, "another model is still loading".into());
        }
        let opts = match worker::load_options(&self.params.dtype) {
            Ok(o) => o,
            Err(e) => return refuse(req, e),
        };
        self.next_load += 1;
        info!("loading {dir} in the background");
        self.loads.insert(self.next_load, req);
        worker.load(self.next_load, PathBuf::from(dir), opts, self.reporter());
    }

    /// One control period: the command to publish, `None` when not active.
    pub(super) fn control(&mut self, now_ros: f64, period: f64) -> Option<[f32; 3]> {
        if !self.active {
            return None;
        }
        let p = &self.params;
        self.filter.set_limits(p.limits());
        let mono = self.mono();
        self.gate.inference_since = self
            .worker
            .as_ref()
            .and_then(Worker::busy_since)
            .map(|t| mono - t.elapsed().as_secs_f64());
        let mut hold = self.gate.hold(mono, p.max_image_age_s, p.max_inference_s);
        if hold == Some(HoldReason::StaleImage)
            && !self.watchdog_tripped
            && self.last_image.is_some()
        {
            warn!(
                "watchdog: no image for {} s, holding zero",
                p.max_image_age_s
            );
            self.watchdog_tripped = true;
            self.invalidate();
        }
        if matches!(
            hold,
            Some(HoldReason::InferenceLate | HoldReason::InferenceFailed)
        ) {
            self.executor.clear();
        }
        let action = if hold.is_none() {
            self.executor.action(now_ros)
        } else {
            None
        };
        if hold.is_none() && action.is_none() {
            hold = Some(HoldReason::NoAction);
        }
        self.hold = hold;
        Some(match action {
            Some(a) => self.filter.drive(a, period),
            None => self.filter.stop(),
        })
    }

    pub(super) fn diagnostics(&self, stamp: r2r::builtin_interfaces::msg::Time) -> DiagnosticArray {
        let (level, message) = match (self.active, self.hold) {
            (false, _) => (DiagnosticStatus::OK as u8, "inactive".to_string()),
            (true, None) => (DiagnosticStatus::OK as u8, "driving".to_string()),
            (true, Some(HoldReason::Disabled)) => {
                (DiagnosticStatus::OK as u8, "disabled".to_string())
            }
            (true, Some(HoldReason::InferenceFailed)) => (
                DiagnosticStatus::ERROR as u8,
                format!("holding zero: inference failed: {}", self.last_error),
            ),
            (true, Some(r)) => (
                DiagnosticStatus::WARN as u8,
                format!("holding zero: {}", r.describe()),
            ),
        };
        let kv = |key: &str, value: String| KeyValue {
            key: key.into(),
            value,
        };
        let image_age = self.last_image.map_or("none".into(), |t| {
            format!("{:.3}", t.elapsed().as_secs_f64())
        });
        DiagnosticArray {
            header: Header {
                stamp,
                frame_id: String::new(),
            },
            status: vec![DiagnosticStatus {
                level,
                name: format!("{NAME}: policy"),
                message,
                hardware_id: String::new(),
                values: vec![
                    kv("model", self.model_dir.display().to_string()),
                    kv("dtype", self.params.dtype.clone()),
                    kv("execution_mode", self.params.execution_mode.clone()),
                    kv("last_inference_ms", format!("{:.1}", self.last_step_ms)),
                    kv("image_age_s", image_age),
                    kv("active", self.active.to_string()),
                    kv("enabled", self.gate.enabled.to_string()),
                    kv("e_stop", self.gate.e_stopped().to_string()),
                    kv("stale_chunks", self.stale_chunks.to_string()),
                    kv("last_error", self.last_error.clone()),
                ],
            }],
        }
    }
}

pub(super) fn split_secs(t: f64) -> (i32, u32) {
    let sec = t.floor();
    (
        sec as i32,
        ((t - sec) * 1e9).round().min(999_999_999.0) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_split_into_sec_and_nanosec() {
        assert_eq!(split_secs(12.25), (12, 250_000_000));
    }
}
