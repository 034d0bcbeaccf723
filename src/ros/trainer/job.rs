//! One fine-tuning job as a child process: its command line (from a goal), the JSON lines it
//! prints on stdout, and running it to an outcome, cancel (SIGTERM) included.

use super::TrainerParams;
use futures::StreamExt;
use r2r::mobile_vla::action::Finetune;
use serde::Deserialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// One line of the child's stdout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(super) enum ChildEvent {
    Progress {
        phase: String,
        #[serde(default)]
        epoch: u32,
        #[serde(default)]
        epochs: u32,
        #[serde(default)]
        step: u64,
        #[serde(default)]
        total_steps: u64,
        #[serde(default = "nan", deserialize_with = "nullable")]
        loss: f32,
        #[serde(default = "nan", deserialize_with = "nullable")]
        lr: f32,
        #[serde(default = "nan", deserialize_with = "nullable")]
        eta_s: f32,
    },
    Done {
        model_dir: String,
        #[serde(default)]
        checkpoint: String,
        #[serde(default)]
        metrics: String,
        #[serde(default = "nan", deserialize_with = "nullable")]
        final_loss: f32,
        #[serde(default = "nan", deserialize_with = "nullable")]
        best_val_loss: f32,
    },
    Cancelled {
        #[serde(default)]
        checkpoint: String,
    },
    Error {
        message: String,
    },
}

fn nan() -> f32 {
    f32::NAN
}

/// A number the child may not have yet: JSON has no NaN, so the trainer writes `null` (no loss before
/// the first step, no validation loss without held-out episodes); it becomes NaN here.
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

impl ChildEvent {
    /// `None` for lines that are not contract events (the child's stdout is not ours to police).
    pub(super) fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// A job to run: the child's command line.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Job {
    pub(super) config: PathBuf,
    pub(super) data: PathBuf,
    pub(super) model: PathBuf,
    pub(super) out: PathBuf,
    pub(super) resume: bool,
}

impl Job {
    /// `mobile_vla train --config <file> --data <dir> --model <dir> --out <run dir> [--resume] --progress json`.
    pub(super) fn args(&self) -> Vec<String> {
        let mut a = vec!["train".to_string()];
        let mut push = |flag: &str, v: &Path| {
            a.push(flag.into());
            a.push(v.display().to_string());
        };
        push("--config", &self.config);
        push("--data", &self.data);
        push("--model", &self.model);
        push("--out", &self.out);
        if self.resume {
            a.push("--resume".into());
        }
        a.extend(["--progress".into(), "json".into()]);
        a
    }

    /// From a goal: an inline YAML config is written into the run directory first.
    pub(super) fn from_goal(
        goal: &Finetune::Goal,
        p: &TrainerParams,
        run_name: &str,
    ) -> Result<Self, String> {
        if goal.dataset_dir.trim().is_empty() {
            return Err("goal.dataset_dir is empty: give the episode directory".into());
        }
        let model = match (goal.init_model_dir.trim(), p.auto_init_model_dir.trim()) {
            ("", "") => {
                return Err("goal.init_model_dir is empty and so is trainer_node's \
                            `auto_init_model_dir`: give the model directory to start from \
                            (`mobile_vla model init` or `model import` make one)"
                    .into())
            }
            ("", node_default) => PathBuf::from(node_default),
            (goal_model, _) => PathBuf::from(goal_model),
        };
        if goal.config.trim().is_empty() && p.config.trim().is_empty() {
            return Err(
                "no training config: give goal.config (a file or inline YAML) \
                        or set trainer_node's `config` parameter"
                    .into(),
            );
        }
        // Absolute, so the model directory announced on ~/model_ready means the same to every
        // node, whatever its working directory.
        let out = std::path::absolute(if goal.output_dir.trim().is_empty() {
            Path::new(&p.runs_dir).join(run_name)
        } else {
            PathBuf::from(&goal.output_dir)
        })
        .map_err(|e| format!("cannot resolve the output directory: {e}"))?;
        let config = if goal.config.trim().is_empty() {
            PathBuf::from(&p.config)
        } else if goal.config.contains('\n') || !Path::new(&goal.config).exists() {
            // Not a file: inline YAML, kept with the run so it can be repeated.
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
            let path = out.join("goal_config.yaml");
            crate::fsutil::write_atomic(&path, |tmp| std::fs::write(tmp, &goal.config))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            path
        } else {
            PathBuf::from(&goal.config)
        };
        Ok(Self {
            config,
            data: PathBuf::from(&goal.dataset_dir),
            model,
            out,
            resume: goal.resume,
        })
    }
}

/// The training executable: the parameter, or `mobile_vla` beside this binary.
pub(super) fn executable(p: &TrainerParams) -> PathBuf {
    if !p.train_executable.is_empty() {
        return PathBuf::from(&p.train_executable);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("mobile_vla")))
        .unwrap_or_else(|| PathBuf::from("mobile_vla"))
}

pub(super) fn run_name() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("run_{}", crate::data::episode::utc_stamp(secs))
}

/// Asks the child to stop: SIGTERM, upon which it saves a checkpoint and exits 0.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory involved.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            warn!(
                "cannot send SIGTERM to the training process {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn feedback_of(e: &ChildEvent) -> Option<Finetune::Feedback> {
    match e {
        ChildEvent::Progress {
            phase,
            epoch,
            epochs,
            step,
            total_steps,
            loss,
            lr,
            eta_s,
        } => Some(Finetune::Feedback {
            epoch: *epoch,
            epochs: *epochs,
            step: *step,
            total_steps: *total_steps,
            loss: *loss,
            learning_rate: *lr,
            eta_s: *eta_s,
            phase: phase.clone(),
        }),
        _ => None,
    }
}

/// How a job ended.
pub(super) enum Outcome {
    Done(Finetune::Result),
    Cancelled(Finetune::Result),
    Failed(String),
}

/// Runs one job to its end, relaying feedback (the last one again every second while the child is
/// quiet) and turning a cancel, or `stop` (the node shutting down), into SIGTERM: the child saves
/// a checkpoint and exits.
pub(super) async fn run_job(
    exe: &Path,
    job: &Job,
    mut feedback: impl FnMut(Finetune::Feedback),
    cancel: &mut (impl futures::Stream<Item = r2r::ActionServerCancelRequest> + Unpin),
    stop: impl Future<Output = ()>,
) -> Outcome {
    tokio::pin!(stop);
    info!("training: {} {}", exe.display(), job.args().join(" "));
    let mut child = match Command::new(exe)
        .args(job.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start {}: {e}", exe.display())),
    };
    let Some(stdout) = child.stdout.take() else {
        return Outcome::Failed("the training process has no stdout".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut last_feedback: Option<Finetune::Feedback> = None;
    let mut last_event: Option<ChildEvent> = None;
    let mut cancelling = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match ChildEvent::parse(&line) {
                    Some(e) => {
                        if let Some(f) = feedback_of(&e) {
                            feedback(f.clone());
                            last_feedback = Some(f);
                            tick.reset();
                        } else {
                            last_event = Some(e);
                        }
                    }
                    None => info!("training: {line}"),
                },
                Ok(None) | Err(_) => break,
            },
            Some(req) = cancel.next(), if !cancelling => {
                info!("cancel requested: stopping training (it saves a checkpoint)");
                req.accept();
                cancelling = true;
                terminate(&child);
            }
            _ = &mut stop, if !cancelling => {
                info!("shutting down: stopping training (it saves a checkpoint)");
                cancelling = true;
                terminate(&child);
            }
            _ = tick.tick() => {
                if let Some(f) = &last_feedback {
                    feedback(f.clone());
                }
            }
        }
    }
    let status = match child.wait().await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("cannot wait for the training process: {e}")),
    };
    let mut result = Finetune::Result::default();
    match last_event {
        Some(ChildEvent::Done {
            model_dir,
            checkpoint,
            metrics,
            final_loss,
            best_val_loss,
        }) if status.success() => {
            result.success = true;
            result.message = format!("trained: {model_dir}");
            result.model_dir = model_dir;
            result.checkpoint_path = checkpoint;
            result.metrics_path = metrics;
            result.final_loss = final_loss;
            result.best_val_loss = best_val_loss;
            Outcome::Done(result)
        }
        Some(ChildEvent::Cancelled { checkpoint }) if status.success() => {
            result.message = format!("cancelled; checkpoint {checkpoint}");
            result.checkpoint_path = checkpoint;
            Outcome::Cancelled(result)
        }
        Some(ChildEvent::Error { message }) => Outcome::Failed(message),
        _ => Outcome::Failed(describe_exit(status)),
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGKILL)) => {
            "the training process was killed (SIGKILL: out of memory?)".into()
        }
        (_, Some(sig)) => format!("the training process died of signal {sig}"),
        (Some(code), _) => {
            format!("the training process exited with status {code} without a result")
        }
        (None, None) => "the training process ended without a result".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_lines_parse() {
        let p = ChildEvent::parse(r#"{"event":"progress","phase":"training","epoch":1,"epochs":3,"step":10,"total_steps":30,"loss":0.5,"lr":1e-4,"samples_per_s":2.0,"eta_s":20.0}"#).unwrap();
        let f = feedback_of(&p).unwrap();
        assert_eq!(
            (f.phase.as_str(), f.epoch, f.step, f.total_steps),
            ("training", 1, 10, 30)
        );
        assert!(matches!(
            ChildEvent::parse(
                r#"{"event":"done","model_dir":"m","checkpoint":"c","metrics":"x","final_loss":0.1,"best_val_loss":0.2}"#
            ),
            Some(ChildEvent::Done { .. })
        ));
        assert_eq!(
            ChildEvent::parse(r#"{"event":"error","message":"no episodes"}"#),
            Some(ChildEvent::Error {
                message: "no episodes".into()
            })
        );
        assert_eq!(ChildEvent::parse("loading weights..."), None);
        // JSON's NaN: no loss while loading, no validation loss without held-out episodes.
        let f = feedback_of(
            &ChildEvent::parse(r#"{"event":"progress","phase":"loading","loss":null,"lr":1e-3}"#)
                .unwrap(),
        )
        .unwrap();
        assert!(f.loss.is_nan() && f.eta_s.is_nan() && f.learning_rate == 1e-3);
        assert!(matches!(
            ChildEvent::parse(r#"{"event":"done","model_dir":"m","final_loss":0.1,"best_val_loss":null}"#),
            Some(ChildEvent::Done { best_val_loss, .. }) if best_val_loss.is_nan()
        ));
    }

    #[test]
    fn job_command_line_follows_the_contract() {
        let j = Job {
            config: "c.yaml".into(),
            data: "eps".into(),
            model: "m".into(),
            out: "runs/r1".into(),
            resume: true,
        };
        assert_eq!(
            j.args().join(" "),
            "train --config c.yaml --data eps --model m --out runs/r1 --resume --progress json"
        );
    }
}
