"""trainer_node as a real process serving mobile_vla/action/Finetune to an rclpy action client.

The training child is the real `mobile_vla train` on a tiny model (`model init` on the fixture's
Kosmos-2-shaped backbone, a small head) and a few generated episodes, so a job takes seconds; crashes are
played by a script that reports progress and is then SIGKILLed (what the kernel's OOM killer does)."""

import json
import math
import os
import stat
import subprocess
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, LifecycleClient, bin_path, spin_until

BACKBONE = REPO / "test/fixtures/policy/hf_robovlms7"
INSTRUCTION = "Navigate around the obstacle on the left side and reach the cup"
W, H = 32, 24

# A few optimiser steps of the small head: seconds in the debug build.
TRAIN_YAML = """seed: 3
batch_size: 2
learning_rate: 1.0e-3
min_lr_scale: 0.1
weight_decay: 0.0
warmup_steps: 2
scheduler: half-cosine
window_size: 3
val_fraction: 0.25
checkpoint_every_n_steps: {ckpt}
train_setup: {{freeze_backbone: true, lora_enable: false}}
trainer: {{max_epochs: 100000, max_steps: {steps}, accumulate_grad_batches: 1, precision: 32}}
"""

CRASHING_TRAINER = """#!/bin/sh
i=0
while [ $i -lt 3 ]; do
  echo '{"event":"progress","phase":"training","epoch":1,"epochs":2,"step":'$i',"total_steps":10,"loss":0.5,"lr":0.0001,"samples_per_s":1.0,"eta_s":9.0}'
  i=$((i+1))
  sleep 1
done
kill -9 $$
"""


def run_cli(*args):
    res = subprocess.run([str(bin_path("mobile_vla")), *map(str, args)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"{args}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def write_episode(path: Path, k: int, frames: int = 8) -> None:
    """A fork-style episode: random BGR frames, keyboard-like actions that depend on the episode."""
    rng = np.random.default_rng(k)
    images = rng.integers(0, 256, size=(frames, H, W, 3), dtype=np.uint8)
    keys = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.6]], dtype=np.float32)
    actions = keys[(np.arange(frames) + k) % len(keys)]
    actions[0] = 0.0
    events = ["episode_start"] + ["start_action"] * (frames - 1)
    with h5py.File(path, "w") as f:
        f.attrs["episode_name"] = path.stem
        f.attrs["total_duration"] = 0.5 * frames
        f.attrs["num_frames"] = frames
        f.attrs["action_chunk_size"] = 8
        f.create_dataset("images", data=images)
        f.create_dataset("actions", data=actions)
        f.create_dataset("action_event_types", data=np.array(events, dtype=h5py.string_dtype()))
        f.create_dataset("language_instruction", data=np.array([INSTRUCTION.encode()], dtype="S256"))


@pytest.fixture
def job(tmp_path):
    """Episodes and a starting model directory for real training jobs."""
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    for k in range(4):
        write_episode(episodes / f"episode_{k}_1box_hori_left.h5", k)
    model = tmp_path / "model_init"
    run_cli("model", "init", "--hf-model", BACKBONE, "--out", model, "--window-size", "3",
            "--fwd-pred-next-n", "2", "--action-dim", "3", "--hidden-size", "16", "--num-layers", "1",
            "--mlp-hidden", "16,16,8")
    return episodes, model


def png(rgb: np.ndarray) -> bytes:
    """Minimal lossless PNG encoder (no PIL in the test interpreter)."""
    import struct

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class Client:
    def __init__(self, node, proc, refusal="dataset_dir"):
        from mobile_vla.action import Finetune
        from rclpy.action import ActionClient

        self.node, self.proc = node, proc
        self.client = ActionClient(node, Finetune, "/trainer_node/finetune")
        assert spin_until(node, lambda: self.client.server_is_ready()), proc.output()
        self.feedback = []  # (arrival time, Feedback)
        self.handshake(refusal)

    def handshake(self, refusal, timeout=30.0):
        """Discovery is asymmetric: the server may not yet have matched our reply readers when it
        looks ready. A goal refused at once (empty dataset_dir, or any goal while not active: the
        reason names `refusal`) is resent until its result arrives, which proves both directions
        of the goal and result services."""
        from action_msgs.msg import GoalStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = self._send_async(dataset_dir="")
            if not spin_until(self.node, sent.done, timeout=3):
                continue
            res = sent.result().get_result_async()
            if spin_until(self.node, res.done, timeout=3):
                r = res.result()
                assert r.status == GoalStatus.STATUS_ABORTED and refusal in r.result.message, r.result.message
                return
        raise AssertionError(f"no answer from trainer_node within {timeout} s:\n{self.proc.output()}")

    def _send_async(self, **goal):
        from mobile_vla.action import Finetune

        return self.client.send_goal_async(
            Finetune.Goal(**goal), feedback_callback=lambda m: self.feedback.append((time.monotonic(), m.feedback)))

    def send(self, **goal):
        fut = self._send_async(**goal)
        assert spin_until(self.node, fut.done), self.proc.output()
        return fut.result()

    def result(self, handle, timeout=60):
        fut = handle.get_result_async()
        assert spin_until(self.node, fut.done, timeout=timeout), self.proc.output()
        return fut.result()


def start_trainer(start_node, tmp_path, *params):
    flat = ["--ros-args", "-p", f"runs_dir:={tmp_path / 'runs'}"]
    for p in params:
        flat += ["-p", p]
    return start_node("trainer_node", *flat)


def test_goal_feedback_result_model_ready(start_node, rclpy_node, tmp_path, job):
    from action_msgs.msg import GoalStatus
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    episodes, model = job
    proc = start_trainer(start_node, tmp_path)
    c = Client(rclpy_node, proc)
    out = tmp_path / "run1"
    handle = c.send(dataset_dir=str(episodes), config=TRAIN_YAML.format(steps=60, ckpt=0), output_dir=str(out),
                    init_model_dir=str(model))
    assert handle.accepted
    r = c.result(handle)
    assert r.status == GoalStatus.STATUS_SUCCEEDED, (r.result.message, proc.output())
    res = r.result
    assert res.success and Path(res.model_dir) == out / "model", res
    assert Path(res.checkpoint_path).is_dir() and Path(res.metrics_path).is_file(), res
    assert math.isfinite(res.final_loss) and res.final_loss > 0, res
    assert (out / "goal_config.yaml").read_text() == TRAIN_YAML.format(steps=60, ckpt=0)

    # Feedback: every phase's fields, at least once a second from the first to the last.
    fbs = [f for _, f in c.feedback]
    assert fbs, proc.output()
    phases = [f.phase for f in fbs]
    assert "training" in phases and set(phases) <= {"loading", "training", "validating", "saving"}, phases
    train = [f for f in fbs if f.phase == "training"]
    assert all(f.total_steps == 60 and f.epochs == 100000 for f in train), train[-1]
    stepped = [f for f in train if f.step > 0]  # before the first step: no loss yet, warmup's lr 0
    assert stepped and all(math.isfinite(f.loss) and f.loss > 0 and 0 < f.learning_rate <= 1e-3 for f in stepped), \
        [(f.step, f.loss, f.learning_rate) for f in train]
    steps = [f.step for f in train]
    assert steps == sorted(steps) and steps[-1] >= 50, steps
    assert all(f.eta_s >= 0 for f in train)
    assert any(f.eta_s > 0 for f in train[:-1]), [f.eta_s for f in train]
    times = [t for t, _ in c.feedback]
    gaps = np.diff(times)
    # Every second at least: the typical gap is ≤ 1 s; the bound on the largest allows a loaded 2-core machine.
    assert len(times) >= 3 and np.median(gaps) <= 1.05 and gaps.max() < 2.5, gaps

    # The trained model is an ordinary model directory: `infer` loads and runs it.
    frame = tmp_path / "f.png"
    frame.write_bytes(png(np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)))
    steps_out = json.loads(run_cli("infer", "--model", res.model_dir, "--instruction", INSTRUCTION,
                                   "--image", frame))["steps"]
    assert len(steps_out[0]["actions"]) == 2 and len(steps_out[0]["actions"][0]) == 3, steps_out

    # Announced on ~/model_ready, transient-local: a subscriber that comes after still gets it.
    got = []
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    rclpy_node.create_subscription(String, "/trainer_node/model_ready", lambda m: got.append(m.data), qos)
    assert spin_until(rclpy_node, lambda: got, timeout=20), proc.output()
    assert got == [res.model_dir], got
    assert proc.stop() == 0, proc.output()


def test_cancel_keeps_a_checkpoint(start_node, rclpy_node, tmp_path, job):
    from action_msgs.msg import GoalStatus

    episodes, model = job
    proc = start_trainer(start_node, tmp_path)
    c = Client(rclpy_node, proc)
    out = tmp_path / "run_cancel"
    handle = c.send(dataset_dir=str(episodes), config=TRAIN_YAML.format(steps=100000, ckpt=0),
                    output_dir=str(out), init_model_dir=str(model))
    assert handle.accepted
    training = lambda: any(f.phase == "training" and f.step >= 3 for _, f in c.feedback)  # noqa: E731
    assert spin_until(rclpy_node, training, timeout=60), proc.output()
    cancel = handle.cancel_goal_async()
    assert spin_until(rclpy_node, cancel.done), proc.output()
    assert len(cancel.result().goals_canceling) == 1
    r = c.result(handle)
    assert r.status == GoalStatus.STATUS_CANCELED, (r.status, r.result.message, proc.output())
    ckpt = Path(r.result.checkpoint_path)
    assert ckpt.is_dir() and ckpt.parent == out / "checkpoints", r.result
    assert out / json.loads((out / "checkpoint.json").read_text())["checkpoint"] == ckpt  # the newest
    assert not r.result.success and not (out / "model").exists()

    # The checkpoint is one a job continues from: resume (same config) starts at its step, not at 0.
    last = int(ckpt.name.split("-")[1])
    c.feedback.clear()
    handle = c.send(dataset_dir=str(episodes), config=TRAIN_YAML.format(steps=100000, ckpt=0),
                    output_dir=str(out), init_model_dir=str(model), resume=True)
    assert handle.accepted
    assert spin_until(rclpy_node, lambda: any(f.phase == "training" and f.step > last for _, f in c.feedback),
                      timeout=60), proc.output()
    first = min(f.step for _, f in c.feedback if f.phase == "training")
    assert first >= last, (first, last)
    # The node shutting down mid-job: the training process is asked to save first, not killed.
    before = json.loads((out / "checkpoint.json").read_text())["checkpoint"]
    assert proc.alive() and proc.stop(timeout=60) == 0, proc.output()
    newest = json.loads((out / "checkpoint.json").read_text())["checkpoint"]
    assert newest != before and int(Path(newest).name.split("-")[1]) > last, (before, newest, proc.output())


def test_crash_aborts_the_goal_and_a_second_goal_is_refused(start_node, rclpy_node, tmp_path):
    from action_msgs.msg import GoalStatus

    script = tmp_path / "crashing_trainer.sh"
    script.write_text(CRASHING_TRAINER)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    proc = start_trainer(start_node, tmp_path, f"train_executable:={script}")
    c = Client(rclpy_node, proc)
    goal = dict(dataset_dir=str(tmp_path / "episodes"), config="seed: 1", init_model_dir=str(tmp_path))
    first = c.send(**goal)
    assert first.accepted
    assert spin_until(rclpy_node, lambda: len(c.feedback) >= 1, timeout=10), proc.output()
    second = c.send(**goal)
    r2 = c.result(second)
    assert r2.status == GoalStatus.STATUS_ABORTED and "busy" in r2.result.message, r2.result.message
    assert "one job at a time" in r2.result.message, r2.result.message

    r1 = c.result(first)
    assert r1.status == GoalStatus.STATUS_ABORTED
    assert "SIGKILL" in r1.result.message, r1.result.message
    fb = c.feedback[-1][1]
    assert (fb.phase, fb.epochs, fb.total_steps) == ("training", 2, 10)
    assert proc.alive(), "the node must survive its child"

    # It keeps serving: the next goal runs (and fails the same way) without a restart.
    again = c.send(**goal)
    assert again.accepted
    assert c.result(again).status == GoalStatus.STATUS_ABORTED
    assert proc.stop() == 0, proc.output()


def test_goal_errors_name_what_to_fix(start_node, rclpy_node, tmp_path, job):
    from action_msgs.msg import GoalStatus

    episodes, model = job
    proc = start_trainer(start_node, tmp_path)
    c = Client(rclpy_node, proc)  # its handshake: an empty dataset_dir is refused naming it
    r = c.result(c.send(dataset_dir=str(episodes), init_model_dir=str(model)))
    assert r.status == GoalStatus.STATUS_ABORTED and "config" in r.result.message, r.result.message
    r = c.result(c.send(dataset_dir=str(episodes), config=TRAIN_YAML.format(steps=2, ckpt=0)))
    assert r.status == GoalStatus.STATUS_ABORTED and "init_model_dir" in r.result.message, r.result.message
    # The real trainer's own error line (no episodes in the folder) is the reason.
    r = c.result(c.send(dataset_dir=str(tmp_path / "none"), config=TRAIN_YAML.format(steps=2, ckpt=0),
                        init_model_dir=str(model), output_dir=str(tmp_path / "run")))
    assert r.status == GoalStatus.STATUS_ABORTED and str(tmp_path / "none") in r.result.message, r.result.message
    assert os.path.isdir(tmp_path) and proc.alive()
    assert proc.stop() == 0, proc.output()


def test_lifecycle_deactivate_stops_the_job_with_a_checkpoint(start_node, rclpy_node, tmp_path, job):
    """A managed trainer (autostart:=false): goals are refused naming the state until configure →
    activate; deactivate stops a running job as a cancel does (checkpoint saved, the goal ends
    canceled saying it was deactivated) and refuses new goals; cleanup and shutdown end it."""
    from action_msgs.msg import GoalStatus

    episodes, model = job
    proc = start_trainer(start_node, tmp_path, "autostart:=false")
    lc = LifecycleClient(rclpy_node, "/trainer_node", proc)
    c = Client(rclpy_node, proc, refusal="trainer_node is unconfigured")
    assert lc.state() == "unconfigured"
    out = tmp_path / "run_managed"
    goal = dict(dataset_dir=str(episodes), config=TRAIN_YAML.format(steps=100000, ckpt=0), output_dir=str(out),
                init_model_dir=str(model))
    assert lc.transition("configure") and lc.state() == "inactive"
    r = c.result(c.send(**goal))
    assert r.status == GoalStatus.STATUS_ABORTED and "inactive" in r.result.message, r.result.message
    assert not out.exists()

    assert lc.transition("activate") and lc.state() == "active"
    handle = c.send(**goal)
    assert handle.accepted
    training = lambda: any(f.phase == "training" and f.step >= 3 for _, f in c.feedback)  # noqa: E731
    assert spin_until(rclpy_node, training, timeout=60), proc.output()
    # Deactivate returns once the training process has saved its checkpoint and exited.
    assert lc.transition("deactivate", timeout=90) and lc.state() == "inactive"
    r = c.result(handle)
    assert r.status == GoalStatus.STATUS_CANCELED, (r.status, r.result.message, proc.output())
    assert "deactivated" in r.result.message, r.result.message
    ckpt = Path(r.result.checkpoint_path)
    assert ckpt.is_dir() and ckpt.parent == out / "checkpoints", r.result
    assert out / json.loads((out / "checkpoint.json").read_text())["checkpoint"] == ckpt
    r = c.result(c.send(**goal))
    assert r.status == GoalStatus.STATUS_ABORTED and "inactive" in r.result.message, r.result.message

    assert lc.transition("cleanup") and lc.state() == "unconfigured"
    assert lc.transition("shutdown") and lc.state() == "finalized"
    assert lc.saw(*lc.WHOLE_CYCLE), [(e.start_state.label, e.goal_state.label) for e in lc.events]
    assert proc.alive() and proc.stop() == 0, proc.output()


def test_autostart_stops_at_a_failing_configure(start_node, rclpy_node, tmp_path):
    proc = start_trainer(start_node, tmp_path, f"train_executable:={tmp_path / 'missing'}")
    lc = LifecycleClient(rclpy_node, "/trainer_node", proc)
    assert lc.state() == "unconfigured"
    assert "train_executable" in proc.output() and proc.alive(), proc.output()
    assert proc.stop() == 0, proc.output()


def test_auto_finetune_is_armed_on_activate(start_node, rclpy_node, tmp_path, job):
    """auto_finetune_after counts recorder_node's saved episodes while active only: those saved
    before activate start nothing; that many more after it start a job whose model is announced."""
    from mobile_vla.msg import RecordingStatus
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    episodes, model = job
    config = tmp_path / "auto.yaml"
    config.write_text(TRAIN_YAML.format(steps=4, ckpt=0))
    proc = start_trainer(start_node, tmp_path, "autostart:=false", "auto_finetune_after:=2",
                         f"auto_dataset_dir:={episodes}", f"auto_init_model_dir:={model}", f"config:={config}")
    lc = LifecycleClient(rclpy_node, "/trainer_node", proc)
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    status = rclpy_node.create_publisher(RecordingStatus, "/recorder_node/status", qos)
    ready = []
    rclpy_node.create_subscription(String, "/trainer_node/model_ready", lambda m: ready.append(m.data), qos)
    assert spin_until(rclpy_node, lambda: status.get_subscription_count() > 0, timeout=30), proc.output()

    def saved(n):
        status.publish(RecordingStatus(episodes_saved=n))
        spin_until(rclpy_node, lambda: False, timeout=0.3)

    assert lc.transition("configure")
    saved(0)
    saved(5)  # inactive: not counted
    assert lc.transition("activate")
    saved(5)  # the count starts here
    saved(6)
    spin_until(rclpy_node, lambda: False, timeout=0.5)
    assert not (tmp_path / "runs").exists(), proc.output()
    saved(7)
    assert spin_until(rclpy_node, lambda: ready, timeout=60), proc.output()
    assert Path(ready[0]).name == "model" and Path(ready[0]).parent.parent == tmp_path / "runs", ready
    assert "2 new episode(s)" in proc.output()
    assert proc.stop() == 0, proc.output()
