//! `policy_node`: camera + instruction → VLA policy → safety → `cmd_vel`, as a managed node.
//!
//! Lifecycle: configure loads `model_dir`, activate drives, deactivate publishes a zero and stops
//! publishing, cleanup unloads; `autostart` walks to active. The policy runs on the inference
//! thread ([`crate::runtime::worker`]) on the newest frame only; a control loop at
//! `control_rate_hz` turns the held chunks into a command ([`crate::runtime::executor`]) and
//! passes it through the safety gate and filter ([`crate::runtime::safety`]). Everything that
//! can decide without ROS lives there; this file wires topics, services and parameters to it.

use super::convert::{action_to_twist, camera_frame, stamp_secs};
use super::lifecycle;
use super::runtime::NodeHandle;
use super::{command_qos, image_qos, status_qos};
use crate::data::recording::CameraFrame;
use crate::runtime::{ChunkExecutor, Gate, SafetyFilter, ZERO};
use futures::{Stream, StreamExt};
use r2r::diagnostic_msgs::msg::DiagnosticArray;
use r2r::geometry_msgs::msg::{Twist, TwistStamped};
use r2r::mobile_vla::msg::ActionChunk as ChunkMsg;
use r2r::mobile_vla::srv::LoadModel;
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::{Bool, Header, String as StringMsg};
use r2r::std_srvs::srv::{SetBool, Trigger};
use r2r::ServiceRequest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

mod params;
mod state;

pub use params::{PolicyParams, DEFAULTS, NAME};
use state::State;

type Frames = Pin<Box<dyn Stream<Item = (CameraFrame, f64)> + Send>>;
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
    let mut last_control = Instant::now();
    let mut diag = tokio::time::interval(Duration::from_secs(1));
    info!(
        "policy_node: {} + {} -> {} [{mode:?} mode at {} Hz, {}]",
        p.image_topic, p.instruction_topic, p.cmd_vel_topic, p.control_rate_hz, p.model_dir
    );
    let now_ros = |h: &NodeHandle<PolicyParams>| stamp_secs(&h.now());
    // One control step, `dt` seconds after the previous command (the acceleration limit's step).
    let command = |s: &mut State, dt: f64| {
        if let Some(cmd) = s.control(now_ros(&h), dt) {
            cmd_pub.publish(cmd, h.now());
        }
    };

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
                last_control = Instant::now();
                command(&mut s, period);
            }
            Some(e) = events.recv() => {
                if let Some(msg) = s.on_result(e, now_ros(&h)) {
                    if let Err(e) = chunk_pub.publish(&msg) {
                        warn!("cannot publish action_chunk: {e}");
                    }
                    // A fresh chunk drives now, not at the next tick (up to a period later). The
                    // acceleration limit gets the time actually elapsed since the last command,
                    // and the ticks restart from here: the rate is kept otherwise.
                    let dt = last_control.elapsed().as_secs_f64().min(period);
                    last_control = Instant::now();
                    control.reset();
                    command(&mut s, dt);
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
