"""`make demo`, shortened: scripts/demo.py's steps end to end on a private domain and output dir
(2 recorded episodes, a few optimiser steps, one held-out seed per task, short episodes): record through
recorder_node, inspect, fine-tune through trainer_node's Finetune action, baselines, policy_node driving
the simulator, report. Checks the loop, not the rates (`make demo` measures those)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_demo_steps_end_to_end(tmp_path, ros_domain):
    out = tmp_path / "demo"
    env = dict(os.environ, MOBILE_VLA_DEMO_OUT=str(out), MOBILE_VLA_DEMO_DOMAIN=str(ros_domain))
    steps = ["record", "inspect", "finetune", "baselines", "drive"]
    try:
        import matplotlib  # noqa: F401  (installed by `setup.sh demo`, not by the test setup)

        steps.append("report")
    except ImportError:
        pass
    res = subprocess.run(
        [sys.executable, "scripts/demo.py", *steps, "--episodes", "2", "--per-task", "1", "--timeout", "8",
         "--train-steps", "6"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["episodes_saved"] == 2 and rec["expert_success_rate"] == 1.0, rec
    assert len(list((out / "episodes").glob("*.h5"))) == 2
    assert json.loads((out / "dataset_info.json").read_text())["total_episodes"] == 2
    assert (out / "episode0.mcap").stat().st_size > 0

    # Fine-tuned through trainer_node: the goal's result names a loadable model directory.
    ft = json.loads((out / "finetune.json").read_text())
    assert ft["status"] == "done" and ft["steps"] == 6 and ft["feedback_messages"] >= 1, ft
    assert (Path(ft["model_dir"]) / "model.safetensors").is_file(), ft
    assert (out / "train" / "goal_config.yaml").read_text().count("max_steps: 6") == 1

    outcomes = {}
    for name in ("expert", "zero", "random", "policy"):
        rollouts = json.loads((out / "rollouts" / f"{name}.json").read_text())["rollouts"]
        assert len(rollouts) == 4 and (out / "rollouts" / f"{name}.mcap").stat().st_size > 0
        outcomes[name] = [r["outcome"] for r in rollouts]
    assert outcomes["expert"] == ["success"] * 4, outcomes
    assert outcomes["zero"] == ["timeout"] * 4, outcomes
    # policy_node drove every episode to an outcome the simulator judged, and its chunks were logged.
    assert all(o in {"success", "collision", "timeout", "wrong_side", "wrong_target"} for o in outcomes["policy"])
    drive = json.loads((out / "drive.json").read_text())
    assert drive["status"] == "done" and drive["inference_ms_median"] > 0, drive
    mcap = (out / "rollouts" / "policy.mcap").read_bytes()
    assert b"/policy_node/action_chunk" in mcap and b"/cmd_vel" in mcap

    timing = json.loads((out / "timing.json").read_text())
    assert list(timing) == steps
    if "report" in steps:
        report = json.loads((out / "report.json").read_text())
        assert set(report["success"]) == {"policy", "expert", "zero", "random"} and not report["pending"]
        assert (out / "trajectories.png").stat().st_size > 0
