//! `trainer_node`: fine-tuning on the robot through the `mobile_vla/action/Finetune` action.
//!
//! Training runs as a child process, `mobile_vla train … --progress json`, not in a thread of
//! the node: an out-of-memory kill, an abort in a native library or a panic ends the child
//! only, and the node turns it into an aborted goal with the reason and keeps serving. A
//! thread would take the node (and its DDS participant) down with it, and its memory would not
//! be returned to the robot between jobs. The child reports on stdout, one JSON object per
//! line (`progress` at least once a second, then `done`, `cancelled` or `error`); its human
//! logs on stderr are forwarded to ours. One job runs at a time; cancel = SIGTERM, upon which
//! the child saves a checkpoint and exits 0. On success the model directory is announced on
//! `~/model_ready` (transient-local), which policy_node follows with `follow_trainer: true`.
//! With `auto_finetune_after` > 0 a job starts by itself after that many new episodes saved by
//! recorder_node (its `~/status`).
//! A managed node ([`lifecycle`]): configure checks the parameters, goals (and the automatic
//! trigger) are served only while active, and deactivate or shutdown stop a running job as a
//! cancel does (checkpoint saved, the goal ends canceled saying why); `autostart` (the default)
//! walks to active at start.
//! The job itself (goal → command line, the child's progress lines, cancel, result) is in `job`.

mod job;

use super::lifecycle::{self, Transition};
use super::params::NodeParams;
use super::runtime::NodeHandle;
use super::status_qos;
use futures::StreamExt;
use job::{executable, run_job, run_name, Job, Outcome};
use r2r::mobile_vla::action::Finetune;
use r2r::mobile_vla::msg::RecordingStatus;
use r2r::std_msgs::msg::String as StringMsg;
use r2r::RosParams;
use serde::Deserialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

pub const NAME: &str = "trainer_node";
pub const DEFAULTS: &str = include_str!("../../config/trainer_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct TrainerParams {
    /// Configure and activate at start; false: wait unconfigured for lifecycle transitions
    pub autostart: bool,
    /// Training executable; empty = the `mobile_vla` next to this node's binary
    pub train_executable: String,
    /// Training config file used when a goal gives none (and by automatic jobs)
    pub config: String,
    /// Run directories of goals without output_dir go under this directory
    pub runs_dir: String,
    /// Start a job after this many new episodes saved by recorder_node; 0 = never
    pub auto_finetune_after: u32,
    /// recorder_node's status topic (mobile_vla/RecordingStatus)
    pub recorder_status_topic: String,
    /// Episode directory of automatic jobs
    pub auto_dataset_dir: String,
    /// Model directory automatic jobs, and goals without init_model_dir, start from
    pub auto_init_model_dir: String,
}

impl NodeParams for TrainerParams {
    fn validate(&self) -> Result<(), String> {
        if self.auto_finetune_after > 0 {
            if self.auto_dataset_dir.trim().is_empty() {
                return Err("`auto_dataset_dir` is empty but `auto_finetune_after` is set: say where recorder_node writes".into());
            }
            if self.auto_init_model_dir.trim().is_empty() {
                return Err("`auto_init_model_dir` is empty but `auto_finetune_after` is set: give the model directory automatic jobs start from".into());
            }
            if self.config.trim().is_empty() {
                return Err("`config` is empty but `auto_finetune_after` is set: give the training config automatic jobs use".into());
            }
        }
        if self.runs_dir.trim().is_empty() {
            return Err("`runs_dir` is empty: give a directory for training runs".into());
        }
        Ok(())
    }
}

type GoalRequest = r2r::ActionServerGoalRequest<Finetune::Action>;

/// A job's stop signal: the node shutting down, or a lifecycle transition (its reason) leaving active.
async fn stopped(
    node: &NodeHandle<TrainerParams>,
    mut stop: watch::Receiver<Option<&'static str>>,
) {
    tokio::select! {
        _ = node.shutdown() => {}
        _ = stop.wait_for(Option::is_some) => {}
    }
}

/// The running job (one at a time), polled by the node's loop: r2r's goal handles cannot move to
/// another thread. It yields the model directory to announce, if any.
type RunningJob = Pin<Box<dyn Future<Output = Option<String>>>>;

/// Configure: the parameters hold together and the training executable is there.
fn configure(p: &TrainerParams) -> Result<PathBuf, String> {
    p.validate()?;
    let exe = executable(p);
    // A bare name is looked up on PATH when the job starts; a path must exist now.
    if exe.components().count() > 1 && !exe.is_file() {
        return Err(format!(
            "training executable {} not found: build it, or set `train_executable`",
            exe.display()
        ));
    }
    Ok(exe)
}

pub async fn run(h: NodeHandle<TrainerParams>) -> anyhow::Result<()> {
    let p = h.params();
    let mut lifecycle = lifecycle::start(&h, p.autostart)?;
    let (mut goals, ready_pub, mut status) = {
        let mut node = h.node();
        let name = node.name()?;
        let status = if p.auto_finetune_after > 0 {
            node.subscribe::<RecordingStatus>(&p.recorder_status_topic, status_qos())?
                .boxed()
        } else {
            futures::stream::pending().boxed()
        };
        (
            // Actions do not expand `~`: the node's own name, relative to its namespace.
            node.create_action_server::<Finetune::Action>(&format!("{name}/finetune"))?,
            node.create_publisher::<StringMsg>("~/model_ready", status_qos())?,
            status,
        )
    };
    let announce = |model: Option<String>| {
        if let Some(dir) = model {
            if let Err(e) = ready_pub.publish(&StringMsg { data: dir.clone() }) {
                warn!("cannot announce {dir}: {e}");
            }
        }
    };
    // Configured: the training executable; active: goals and the automatic trigger are served.
    let mut exe: Option<PathBuf> = None;
    let mut active = false;
    let (stop_tx, stop_rx) = watch::channel(None);
    let mut running: Option<RunningJob> = None;
    let mut running_out = PathBuf::new();
    let mut episodes_seen: Option<u32> = None;
    let mut auto_pending = false;

    loop {
        let start: Option<(Job, Option<GoalRequest>)> = tokio::select! {
            _ = h.shutdown() => break,
            pending = lifecycle.next() => {
                let result = match pending.transition {
                    Transition::Configure => configure(&p).map(|e| {
                        info!("trainer_node: serving finetune with {}", e.display());
                        exe = Some(e);
                    }),
                    Transition::Activate => {
                        active = true;
                        Ok(())
                    }
                    Transition::Deactivate | Transition::Cleanup | Transition::Shutdown => {
                        active = false;
                        // Re-armed on activate: episodes count from then.
                        episodes_seen = None;
                        auto_pending = false;
                        if let Some(job) = running.take() {
                            let why = if pending.transition == Transition::Deactivate { "deactivated" } else { "shut down" };
                            info!("{why}: stopping the training job (it saves a checkpoint)");
                            stop_tx.send_replace(Some(why));
                            match tokio::time::timeout(SAVE_ON_SHUTDOWN, job).await {
                                Ok(model) => announce(model),
                                Err(_) => warn!("the training process did not stop in time: killed (its last checkpoint stays)"),
                            }
                        }
                        if pending.transition != Transition::Deactivate {
                            exe = None;
                        }
                        Ok(())
                    }
                };
                lifecycle.finish(pending, result);
                None
            }
            model = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                announce(model);
                None
            }
            Some(req) = goals.next() => {
                let refused = if !active {
                    Some(format!(
                        "trainer_node is {}: goals are accepted only while it is active (ros2 lifecycle set <node> activate)",
                        lifecycle.state().label()
                    ))
                } else if running.is_some() {
                    Some(format!("busy: the job writing {} is running; one job at a time", running_out.display()))
                } else {
                    None
                };
                match refused.map_or_else(|| Job::from_goal(&req.goal, &p, &run_name()), Err) {
                    Ok(job) => Some((job, Some(req))),
                    Err(reason) => {
                        warn!("goal refused: {reason}");
                        abort_request(req, reason);
                        None
                    }
                }
            }
            // Armed while active only: episodes saved before activation do not count.
            Some(s) = status.next() => if !active {
                None
            } else {
                let saved = s.episodes_saved;
                let base = *episodes_seen.get_or_insert(saved);
                if saved >= base + p.auto_finetune_after {
                    auto_pending = true;
                }
                if auto_pending && running.is_none() {
                    auto_pending = false;
                    episodes_seen = Some(saved);
                    info!("{} new episode(s): fine-tuning automatically", saved - base);
                    Some((Job {
                        config: PathBuf::from(&p.config),
                        data: PathBuf::from(&p.auto_dataset_dir),
                        model: PathBuf::from(&p.auto_init_model_dir),
                        out: Path::new(&p.runs_dir).join(run_name()),
                        resume: false,
                    }, None))
                } else {
                    None
                }
            }
        };
        let (Some((job, req)), Some(exe)) = (start, exe.clone()) else {
            continue;
        };
        running_out = job.out.clone();
        stop_tx.send_replace(None);
        let stop = stop_rx.clone();
        let node = h.clone();
        running = Some(Box::pin(async move {
            match req {
                Some(req) => serve_goal(&exe, &job, req, &node, stop).await,
                None => {
                    let mut no_cancel =
                        futures::stream::pending::<r2r::ActionServerCancelRequest>();
                    match run_job(&exe, &job, |_| {}, &mut no_cancel, stopped(&node, stop)).await {
                        Outcome::Done(r) => Some(r.model_dir),
                        Outcome::Cancelled(_) => None,
                        Outcome::Failed(reason) => {
                            warn!("automatic fine-tuning failed: {reason}");
                            None
                        }
                    }
                }
            }
        }));
    }
    if let Some(job) = running {
        // The job saw the shutdown too and asked the child to save a checkpoint: let it finish.
        info!("waiting up to {SAVE_ON_SHUTDOWN:?} for the training process to save a checkpoint");
        if tokio::time::timeout(SAVE_ON_SHUTDOWN, job).await.is_err() {
            warn!("the training process did not stop in time: killed (its last checkpoint stays)");
        }
    }
    Ok(())
}

/// How long a shutdown waits for a running training process to save and exit.
const SAVE_ON_SHUTDOWN: Duration = Duration::from_secs(60);

/// Accepts the goal only to end it at once with the reason: the action protocol's reject
/// carries no text, and a client deserves to know why.
fn abort_request(req: GoalRequest, reason: String) {
    match req.accept() {
        Ok((mut g, _)) => {
            let result = Finetune::Result {
                message: reason,
                ..Default::default()
            };
            if let Err(e) = g.abort(result) {
                warn!("cannot abort the goal: {e}");
            }
        }
        Err(e) => warn!("cannot answer the goal: {e}"),
    }
}

/// Runs an accepted goal; the model directory on success.
async fn serve_goal(
    exe: &Path,
    job: &Job,
    req: GoalRequest,
    node: &NodeHandle<TrainerParams>,
    stop: watch::Receiver<Option<&'static str>>,
) -> Option<String> {
    let (mut g, mut cancel) = match req.accept() {
        Ok(x) => x,
        Err(e) => {
            warn!("cannot accept the goal: {e}");
            return None;
        }
    };
    let fb = g.clone();
    let outcome = run_job(
        exe,
        job,
        |f| {
            if let Err(e) = fb.publish_feedback(f) {
                warn!("cannot publish feedback: {e}");
            }
        },
        &mut cancel,
        stopped(node, stop.clone()),
    )
    .await;
    let (sent, model) = match outcome {
        Outcome::Done(r) => {
            let dir = r.model_dir.clone();
            info!("fine-tuning done: {dir}");
            (g.succeed(r), Some(dir))
        }
        // Stopped by the node's shutdown, not by the client: the goal ends aborted, with why.
        Outcome::Cancelled(mut r) if node.is_shutdown() => {
            r.message = format!("trainer_node shut down: {}", r.message);
            (g.abort(r), None)
        }
        // A client's cancel, or a lifecycle transition (deactivate, shutdown): canceled either
        // way, the message saying which. (r2r's `cancel` sends the CANCELED result without a
        // client's request; only the status topic keeps showing the goal as executing.)
        Outcome::Cancelled(mut r) => {
            if let Some(why) = *stop.borrow() {
                r.message = format!("trainer_node {why}: {}", r.message);
            }
            (g.cancel(r), None)
        }
        Outcome::Failed(reason) => {
            warn!("fine-tuning failed: {reason}");
            (
                g.abort(Finetune::Result {
                    message: reason,
                    ..Default::default()
                }),
                None,
            )
        }
    };
    if let Err(e) = sent {
        warn!("cannot send the result: {e}");
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let p: TrainerParams =
            crate::ros::params::from_yaml(DEFAULTS, "config/trainer_node.yaml", NAME).unwrap();
        p.validate().unwrap();
        let mut bad = p;
        bad.auto_finetune_after = 3;
        bad.auto_dataset_dir.clear();
        assert!(bad.validate().unwrap_err().contains("auto_dataset_dir"));
    }
}
