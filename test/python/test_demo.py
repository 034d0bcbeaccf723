"""`make demo`, shortened: scripts/demo.py's steps end to end on a private domain and output dir
(2 recorded episodes, one held-out seed per task, short episodes). Checks the loop, not the rates;
the report step (matplotlib) is left to `make demo`."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_demo_steps_end_to_end(tmp_path, ros_domain):
    out = tmp_path / "demo"
    env = dict(os.environ, MOBILE_VLA_DEMO_OUT=str(out), MOBILE_VLA_DEMO_DOMAIN=str(ros_domain))
    steps = ["record", "inspect", "finetune", "baselines", "drive"]
    res = subprocess.run(
        [sys.executable, "scripts/demo.py", *steps, "--episodes", "2", "--per-task", "1", "--timeout", "8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["episodes_saved"] == 2 and rec["expert_success_rate"] == 1.0, rec
    assert len(list((out / "episodes").glob("*.h5"))) == 2
    assert json.loads((out / "dataset_info.json").read_text())["total_episodes"] == 2
    assert (out / "episode0.mcap").stat().st_size > 0
    outcomes = {}
    for name in ("expert", "zero", "random"):
        rollouts = json.loads((out / "rollouts" / f"{name}.json").read_text())["rollouts"]
        assert len(rollouts) == 4 and (out / "rollouts" / f"{name}.mcap").stat().st_size > 0
        outcomes[name] = [r["outcome"] for r in rollouts]
    assert outcomes["expert"] == ["success"] * 4, outcomes
    assert outcomes["zero"] == ["timeout"] * 4, outcomes
    # The trainer/policy stages either ran or said they are pending; they never pretend.
    for stage in ("finetune.json", "drive.json"):
        assert json.loads((out / stage).read_text())["status"] in ("pending", "done")
    timing = json.loads((out / "timing.json").read_text())
    assert list(timing) == steps
