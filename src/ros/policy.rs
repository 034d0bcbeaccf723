//! `policy_node`: camera + instruction → VLA policy → safety → `cmd_vel`, as a managed node.
//!
//! Lifecycle: configure loads `model_dir`, activate drives, deactivate publishes a zero and stops
//! publishing, cleanup unloads; `autostart` walks to active. The policy runs on the inference
//! thread ([`crate::runtime::worker`]) on the newest frame only; a control loop at
//! `control_rate_hz` turns the held chunks into a command ([`crate::runtime::executor`]) and
//! passes it through the safety gate and filter ([`crate::runtime::safety`]). Everything that
//! can decide without ROS lives there; this file wires topics, services and parameters to it.

use super::convert::{action_to_twist, camera_frame, stamp_secs};
use super::lifecycle::{self, Transition};
use super::params::NodeParams;
use super::runtime::NodeHandle;
use super::{command_qos, image_qos, status_qos};
use crate::data::recording::CameraFrame;
use crate::runtime::worker::{self, Event, Job, Worker};
use crate::runtime::{
    ChunkExecutor, ExecutionMode, Gate, HoldReason, SafetyFilter, SafetyLimits, TimedChunk, ZERO,
};
use futures::{Stream, StreamExt};
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::geometry_msgs::msg::{Twist, TwistStamped};
use r2r::mobile_vla::msg::ActionChunk as ChunkMsg;
use r2r::mobile_vla::srv::LoadModel;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::{Bool, Header, String as StringMsg};
use r2r::std_srvs::srv::{SetBool, Trigger};
use r2r::{RosParams, ServiceRequest};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub const NAME: &str = "policy_node";
pub const DEFAULTS: &str = include_str!("../../config/policy_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct PolicyParams {
    /// Model directory loaded on configure
    pub model_dir: String,
    /// Weight format: f32, or i16 (12-bit packed, faster)
    pub dtype: String,
    /// Configure and activate at start
    pub autostart: bool,
    /// Camera topic
    pub image_topic: String,
    /// Subscribe to sensor_msgs/CompressedImage instead of sensor_msgs/Image
    pub compressed: bool,
    /// Instruction topic (std_msgs/String, volatile or transient-local)
    pub instruction_topic: String,
    /// Instruction used until one is published
    pub instruction: String,
    /// Velocity command output topic
    pub cmd_vel_topic: String,
    /// Publish geometry_msgs/TwistStamped instead of Twist
    pub cmd_stamped: bool,
    /// frame_id of TwistStamped and ActionChunk headers
    pub frame_id: String,
    /// Control loop rate [Hz]
    pub control_rate_hz: f64,
    /// first | chunk | ensemble
    pub execution_mode: String,
    /// Ensemble weight exponent per chunk (ACT: 0.01)
    pub ensemble_decay: f64,
    /// An image gap longer than this starts a new history [s]
    pub history_reset_s: f64,
    /// Watchdog: a newest image older than this commands zero [s]
    pub max_image_age_s: f64,
    /// An inference running longer than this commands zero and its chunk is dropped [s]
    pub max_inference_s: f64,
    /// Velocity limit, linear x [m/s]
    pub max_vel_x: f64,
    /// Velocity limit, linear y [m/s]
    pub max_vel_y: f64,
    /// Velocity limit, angular z [rad/s]
    pub max_vel_wz: f64,
    /// Acceleration limit, linear x [m/s^2]
    pub max_acc_x: f64,
    /// Acceleration limit, linear y [m/s^2]
    pub max_acc_y: f64,
    /// Acceleration limit, angular z [rad/s^2]
    pub max_acc_wz: f64,
    /// Policy outputs below this magnitude are zeroed per axis
    pub dead_zone: f64,
    /// E-stop topic (std_msgs/Bool, true latches until ~/reset_e_stop)
    pub e_stop_topic: String,
    /// Deadman topic (std_msgs/Bool, true = held); empty disables the deadman
    pub heartbeat_topic: String,
    /// No heartbeat for this long commands zero [s]
    pub heartbeat_timeout_s: f64,
    /// Reload models announced on model_ready_topic
    pub follow_trainer: bool,
    /// trainer_node's model announcements (std_msgs/String, transient-local)
    pub model_ready_topic: String,
}

impl PolicyParams {
    pub fn limits(&self) -> SafetyLimits {
        let f = |v: f64| v as f32;
        SafetyLimits {
            max_vel: [f(self.max_vel_x), f(self.max_vel_y), f(self.max_vel_wz)],
            max_acc: [f(self.max_acc_x), f(self.max_acc_y), f(self.max_acc_wz)],
            dead_zone: f(self.dead_zone),
        }
    }

    fn mode(&self) -> Result<ExecutionMode, String> {
        self.execution_mode
            .parse()
            .map_err(|e| format!("`execution_mode`: {e}"))
    }
}

impl NodeParams for PolicyParams {
    // Read every control period.
    const LIVE: &'static [&'static str] = &[
        "max_vel_x",
        "max_vel_y",
        "max_vel_wz",
        "max_acc_x",
        "max_acc_y",
        "max_acc_wz",
        "dead_zone",
        "max_image_age_s",
        "max_inference_s",
    ];

    fn validate(&self) -> Result<(), String> {
        if self.model_dir.trim().is_empty() {
            return Err("`model_dir` is empty: give the model directory to serve".into());
        }
        worker::load_options(&self.dtype)?;
        self.mode()?;
        self.limits().validate()?;
        for (name, v) in [
            ("control_rate_hz", self.control_rate_hz),
            ("history_reset_s", self.history_reset_s),
            ("max_image_age_s", self.max_image_age_s),
            ("max_inference_s", self.max_inference_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("`{name}` is {v}: it must be > 0"));
            }
        }
        if !(self.ensemble_decay.is_finite() && self.ensemble_decay >= 0.0) {
            return Err(format!(
                "`ensemble_decay` is {}: it must be ≥ 0",
                self.ensemble_decay
            ));
        }
        Ok(())
    }
}

type Frames = Pin<Box<dyn Stream<Item = (CameraFrame, f64)> + Send>>;

/// Everything that changes while the node runs.
struct State {
    params: PolicyParams,
    start: Instant,
    worker: Option<Worker>,
    model_dir: PathBuf,
    active: bool,
    gate: Gate,
    executor: ChunkExecutor,
    filter: SafetyFilter,
    /// Results of older epochs are dropped (new instruction, reset, watchdog, model swap).
    epoch: u64,
    instruction: String,
    reset_next: bool,
    last_image: Option<Instant>,
    watchdog_tripped: bool,
    last_step_ms: f64,
    stale_chunks: u64,
    hold: Option<HoldReason>,
    last_error: String,
    events: mpsc::UnboundedSender<Event>,
    loads: HashMap<u64, Option<ServiceRequest<LoadModel::Service>>>,
    next_load: u64,
}

impl State {
    fn mono(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn reporter(&self) -> impl Fn(Event) + Send + Sync + Clone + 'static {
        let tx = self.events.clone();
        move |e| {
            // Gone only at shutdown.
            let _ = tx.send(e);
        }
    }

    /// Drops every held chunk and any inference in flight: nothing drives until a fresh one.
    fn invalidate(&mut self) {
        self.epoch += 1;
        self.executor.clear();
    }

    async fn transition(&mut self, t: Transition) -> Result<(), String> {
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

    fn on_image(&mut self, frame: CameraFrame, stamp: f64, now_ros: f64) {
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

    fn on_instruction(&mut self, text: String) {
        if text != self.instruction {
            info!("new instruction: \"{text}\"");
            self.instruction = text;
            self.invalidate();
        }
    }

    /// A finished inference: `Some(chunk message)` to publish when it is current.
    fn on_result(&mut self, event: Event, now_ros: f64) -> Option<ChunkMsg> {
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
    fn load(&mut self, dir: String, req: Option<ServiceRequest<LoadModel::Service>>) {
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
    fn control(&mut self, now_ros: f64, period: f64) -> Option<[f32; 3]> {
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

    fn diagnostics(&self, stamp: r2r::builtin_interfaces::msg::Time) -> DiagnosticArray {
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

fn split_secs(t: f64) -> (i32, u32) {
    let sec = t.floor();
    (
        sec as i32,
        ((t - sec) * 1e9).round().min(999_999_999.0) as u32,
    )
}

/// Publishes commands as Twist or TwistStamped.
enum CmdPublisher {
    Plain(r2r::Publisher<Twist>),
    Stamped(r2r::Publisher<TwistStamped>, String),
}

impl CmdPublisher {
    fn publish(&self, cmd: [f32; 3], stamp: r2r::builtin_interfaces::msg::Time) {
        let twist = action_to_twist(cmd);
        let sent = match self {
            Self::Plain(p) => p.publish(&twist),
            Self::Stamped(p, frame_id) => p.publish(&TwistStamped {
                header: Header {
                    stamp,
                    frame_id: frame_id.clone(),
                },
                twist,
            }),
        };
        if let Err(e) = sent {
            warn!("cannot publish a command: {e}");
        }
    }
}

fn respond<T: r2r::WrappedServiceTypeSupport + 'static>(
    name: &str,
    req: ServiceRequest<T>,
    resp: T::Response,
) {
    if let Err(e) = req.respond(resp) {
        warn!("{name}: cannot respond: {e}");
    }
}

pub async fn run(h: NodeHandle<PolicyParams>) -> anyhow::Result<()> {
    let p = h.params();
    let mode = p.mode().map_err(anyhow::Error::msg)?;
    let mut lifecycle = lifecycle::start(&h, p.autostart)?;
    let never = || futures::stream::pending::<Bool>().boxed();
    let (mut frames, mut instructions, mut latched, mut e_stops, mut heartbeats, mut ready) = {
        let mut node = h.node();
        let frames: Frames = if p.compressed {
            node.subscribe::<CompressedImage>(&p.image_topic, image_qos())?
                .map(|m| {
                    let stamp = stamp_secs(&m.header.stamp);
                    (
                        CameraFrame::Compressed {
                            format: m.format,
                            data: m.data,
                        },
                        stamp,
                    )
                })
                .boxed()
        } else {
            node.subscribe::<Image>(&p.image_topic, image_qos())?
                .map(|m| {
                    let stamp = stamp_secs(&m.header.stamp);
                    (camera_frame(m), stamp)
                })
                .boxed()
        };
        let heartbeats = if p.heartbeat_topic.is_empty() {
            never()
        } else {
            node.subscribe::<Bool>(&p.heartbeat_topic, command_qos())?
                .boxed()
        };
        let ready = if p.follow_trainer {
            node.subscribe::<StringMsg>(&p.model_ready_topic, status_qos())?
                .boxed()
        } else {
            futures::stream::pending().boxed()
        };
        (
            frames,
            // A volatile subscription matches every publisher; the transient-local one also
            // gets the instruction a latched publisher sent before we started.
            node.subscribe::<StringMsg>(&p.instruction_topic, command_qos())?,
            node.subscribe::<StringMsg>(&p.instruction_topic, status_qos())?,
            node.subscribe::<Bool>(&p.e_stop_topic, command_qos())?,
            heartbeats,
            ready,
        )
    };
    let (
        cmd_pub,
        chunk_pub,
        diag_pub,
        mut enable_srv,
        mut reset_srv,
        mut reset_e_stop_srv,
        mut load_srv,
    ) = {
        let mut node = h.node();
        let srv = r2r::QosProfile::services_default;
        let cmd_pub = if p.cmd_stamped {
            CmdPublisher::Stamped(
                node.create_publisher(&p.cmd_vel_topic, command_qos())?,
                p.frame_id.clone(),
            )
        } else {
            CmdPublisher::Plain(node.create_publisher(&p.cmd_vel_topic, command_qos())?)
        };
        (
            cmd_pub,
            node.create_publisher::<ChunkMsg>("~/action_chunk", command_qos())?,
            node.create_publisher::<DiagnosticArray>("/diagnostics", command_qos())?,
            node.create_service::<SetBool::Service>("~/enable", srv())?,
            node.create_service::<Trigger::Service>("~/reset", srv())?,
            node.create_service::<Trigger::Service>("~/reset_e_stop", srv())?,
            node.create_service::<LoadModel::Service>("~/load_model", srv())?,
        )
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let heartbeat_timeout = (!p.heartbeat_topic.is_empty()).then_some(p.heartbeat_timeout_s);
    let mut s = State {
        start: Instant::now(),
        worker: None,
        model_dir: PathBuf::from(&p.model_dir),
        active: false,
        gate: Gate::new(heartbeat_timeout),
        executor: ChunkExecutor::new(mode, p.ensemble_decay),
        filter: SafetyFilter::new(p.limits()),
        epoch: 0,
        instruction: p.instruction.clone(),
        reset_next: false,
        last_image: None,
        watchdog_tripped: false,
        last_step_ms: 0.0,
        stale_chunks: 0,
        hold: None,
        last_error: String::new(),
        events: events_tx,
        loads: HashMap::new(),
        next_load: 0,
        params: p.clone(),
    };
    let period = 1.0 / p.control_rate_hz;
    let mut control = tokio::time::interval(Duration::from_secs_f64(period));
    control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut diag = tokio::time::interval(Duration::from_secs(1));
    info!(
        "policy_node: {} + {} -> {} [{mode:?} mode at {} Hz, {}]",
        p.image_topic, p.instruction_topic, p.cmd_vel_topic, p.control_rate_hz, p.model_dir
    );
    let now_ros = |h: &NodeHandle<PolicyParams>| stamp_secs(&h.now());

    loop {
        tokio::select! {
            biased;
            _ = h.shutdown() => break,
            pending = lifecycle.next() => {
                let was_active = s.active;
                let result = s.transition(pending.transition).await;
                if was_active && !s.active {
                    // Deactivate, cleanup and shutdown leave the robot standing.
                    cmd_pub.publish(s.filter.stop(), h.now());
                }
                lifecycle.finish(pending, result);
            }
            _ = control.tick() => {
                s.params = h.params();
                if let Some(cmd) = s.control(now_ros(&h), period) {
                    cmd_pub.publish(cmd, h.now());
                }
            }
            Some(e) = events.recv() => {
                if let Some(msg) = s.on_result(e, now_ros(&h)) {
                    if let Err(e) = chunk_pub.publish(&msg) {
                        warn!("cannot publish action_chunk: {e}");
                    }
                }
            }
            Some((frame, stamp)) = frames.next() => s.on_image(frame, stamp, now_ros(&h)),
            Some(m) = instructions.next() => s.on_instruction(m.data),
            Some(m) = latched.next() => s.on_instruction(m.data),
            Some(m) = e_stops.next() => {
                if m.data && !s.gate.e_stopped() {
                    warn!("E-STOP: holding zero until ~/reset_e_stop");
                    s.gate.e_stop();
                    s.invalidate();
                    if s.active {
                        cmd_pub.publish(s.filter.stop(), h.now());
                    }
                }
            }
            Some(m) = heartbeats.next() => s.gate.heartbeat(s.mono(), m.data),
            Some(m) = ready.next() => {
                if std::path::Path::new(&m.data) != s.model_dir.as_path() {
                    s.load(m.data, None);
                }
            }
            Some(req) = enable_srv.next() => {
                let (success, message) = if s.active {
                    s.gate.enabled = req.message.data;
                    s.invalidate();
                    (true, if req.message.data { "enabled" } else { "disabled: holding zero" }.to_string())
                } else {
                    (false, "not active: activate the node first (ros2 lifecycle set … activate)".to_string())
                };
                respond("enable", req, SetBool::Response { success, message });
            }
            Some(req) = reset_srv.next() => {
                s.invalidate();
                s.reset_next = true;
                respond("reset", req, Trigger::Response { success: true, message: "history cleared".into() });
            }
            Some(req) = reset_e_stop_srv.next() => {
                let message = if s.gate.e_stopped() { "e-stop cleared" } else { "no e-stop was latched" };
                s.gate.reset_e_stop();
                respond("reset_e_stop", req, Trigger::Response { success: true, message: message.into() });
            }
            Some(req) = load_srv.next() => {
                let path = req.message.path.clone();
                s.load(path, Some(req));
            }
            _ = diag.tick() => {
                if let Err(e) = diag_pub.publish(&s.diagnostics(h.now())) {
                    warn!("cannot publish diagnostics: {e}");
                }
            }
        }
    }
    if s.active {
        info!("shutting down: commanding zero");
        cmd_pub.publish(ZERO, h.now());
        // Let DDS deliver it before the publisher goes away.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validation_names_the_parameter() {
        let mut p: PolicyParams =
            crate::ros::params::from_yaml(DEFAULTS, "config/policy_node.yaml", NAME).unwrap();
        assert!(p.validate().unwrap_err().contains("model_dir"));
        p.model_dir = "model".into();
        p.validate().unwrap();
        assert_eq!(p.limits().dead_zone, 0.15);
        for (field, set) in [
            (
                "execution_mode",
                Box::new(|p: &mut PolicyParams| p.execution_mode = "all".into())
                    as Box<dyn Fn(&mut PolicyParams)>,
            ),
            ("dtype", Box::new(|p| p.dtype = "f16".into())),
            ("control_rate_hz", Box::new(|p| p.control_rate_hz = 0.0)),
            ("max_vel_wz", Box::new(|p| p.max_vel_wz = -1.0)),
        ] {
            let mut bad = p.clone();
            set(&mut bad);
            assert!(bad.validate().unwrap_err().contains(field), "{field}");
        }
    }

    #[test]
    fn stamps_split_into_sec_and_nanosec() {
        assert_eq!(split_secs(12.25), (12, 250_000_000));
    }
}
