"""trainer_node as a real process serving mobile_vla/action/Finetune to an rclpy action client.

The training child is a real process. Until `mobile_vla train` lands these tests use children that
fail: one that reports progress and is then SIGKILLed (what the kernel's OOM killer does), and the
`mobile_vla` binary itself, which has no `train` subcommand yet and exits with a usage error."""

import os
import stat

from conftest import spin_until

CRASHING_TRAINER = """#!/bin/sh
i=0
while [ $i -lt 3 ]; do
  echo '{"event":"progress","phase":"training","epoch":1,"epochs":2,"step":'$i',"total_steps":10,"loss":0.5,"lr":0.0001,"samples_per_s":1.0,"eta_s":9.0}'
  i=$((i+1))
  sleep 1
done
kill -9 $$
"""


class Client:
    def __init__(self, node, proc):
        from mobile_vla.action import Finetune
        from rclpy.action import ActionClient

        self.node, self.proc = node, proc
        self.client = ActionClient(node, Finetune, "/trainer_node/finetune")
        assert spin_until(node, lambda: self.client.server_is_ready()), proc.output()
        self.feedback = []

    def send(self, **goal):
        from mobile_vla.action import Finetune

        fut = self.client.send_goal_async(Finetune.Goal(**goal), feedback_callback=self.feedback.append)
        assert spin_until(self.node, fut.done), self.proc.output()
        return fut.result()

    def result(self, handle, timeout=30):
        fut = handle.get_result_async()
        assert spin_until(self.node, fut.done, timeout=timeout), self.proc.output()
        return fut.result()


def test_crash_aborts_the_goal_and_a_second_goal_is_refused(start_node, rclpy_node, tmp_path):
    from action_msgs.msg import GoalStatus

    script = tmp_path / "crashing_trainer.sh"
    script.write_text(CRASHING_TRAINER)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    proc = start_node("trainer_node", "--ros-args", "-p", f"train_executable:={script}",
                      "-p", f"runs_dir:={tmp_path / 'runs'}")
    c = Client(rclpy_node, proc)
    first = c.send(dataset_dir=str(tmp_path / "episodes"))
    assert first.accepted
    assert spin_until(rclpy_node, lambda: len(c.feedback) >= 1, timeout=10), proc.output()
    second = c.send(dataset_dir=str(tmp_path / "episodes"))
    r2 = c.result(second)
    assert r2.status == GoalStatus.STATUS_ABORTED and "busy" in r2.result.message, r2.result.message

    r1 = c.result(first)
    assert r1.status == GoalStatus.STATUS_ABORTED
    assert "SIGKILL" in r1.result.message, r1.result.message
    fb = c.feedback[-1].feedback
    assert (fb.phase, fb.epochs, fb.total_steps) == ("training", 2, 10)
    assert proc.alive(), "the node must survive its child"

    # It keeps serving: the next goal runs (and fails the same way) without a restart.
    again = c.send(dataset_dir=str(tmp_path / "episodes"))
    assert again.accepted
    assert c.result(again).status == GoalStatus.STATUS_ABORTED
    assert proc.stop() == 0, proc.output()


def test_default_executable_and_missing_dataset(start_node, rclpy_node, tmp_path):
    from action_msgs.msg import GoalStatus

    proc = start_node("trainer_node", "--ros-args", "-p", f"runs_dir:={tmp_path / 'runs'}")
    c = Client(rclpy_node, proc)
    r = c.result(c.send(dataset_dir=""))
    assert r.status == GoalStatus.STATUS_ABORTED and "dataset_dir" in r.result.message
    # The mobile_vla beside the node is found; without a `train` subcommand it exits 2.
    r = c.result(c.send(dataset_dir=str(tmp_path), output_dir=str(tmp_path / "run")))
    assert r.status == GoalStatus.STATUS_ABORTED and "status 2" in r.result.message, r.result.message
    assert os.path.isdir(tmp_path) and proc.alive()
    assert proc.stop() == 0, proc.output()
