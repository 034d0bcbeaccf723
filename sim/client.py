"""The rclpy side of sim_node: reset to a task and seed, drive an episode with keyboard-style presses
(timed in sim time, from `/clock`), collect the pose track and the simulator's outcome, and optionally
log every topic of the rollout to MCAP."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from geometry_msgs.msg import PoseStamped, Twist
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String

from sim.mcap_log import McapLog
from sim.policies import KEYS, PRESS_S, RELEASE_S
from sim.world import Layout, make_layout

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def twist(vx: float, vy: float, wz: float) -> Twist:
    t = Twist()
    t.linear.x, t.linear.y, t.angular.z = float(vx), float(vy), float(wz)
    return t


@dataclass
class Rollout:
    episode: dict
    outcome: dict
    track: list[tuple[float, float, float, float]] = field(default_factory=list)  # t, x, y, yaw
    presses: int = 0

    def to_json(self) -> dict:
        return {**self.outcome, "instruction": self.episode["instruction"], "layout": self.episode["layout"],
                "presses": self.presses, "track": [[round(v, 3) for v in p] for p in self.track]}


class SimClient:
    def __init__(self, node, sim_name: str = "sim_node", images: bool = False, watch_cmd: bool = False):
        self.node = node
        self.executor = SingleThreadedExecutor(context=node.context)
        self.executor.add_node(node)
        self.cmd_pub = node.create_publisher(Twist, "cmd_vel", 10)
        self.reset_pub = node.create_publisher(String, f"/{sim_name}/reset", 10)
        self.episode: dict | None = None
        self.outcomes: list[dict] = []
        self.pose: tuple[float, float, float] | None = None
        self.sim_time = 0.0
        self.log: McapLog | None = None
        self.images = 0
        node.create_subscription(String, f"/{sim_name}/episode", self._on_episode, LATCHED)
        node.create_subscription(String, f"/{sim_name}/outcome", self._on_outcome, 10)
        node.create_subscription(PoseStamped, "pose", self._on_pose, 10)
        node.create_subscription(Clock, "/clock", self._on_clock, 10)
        node.create_subscription(String, "instruction", lambda m: self._log("/instruction", m), LATCHED)
        if images:
            node.create_subscription(Image, "image", self._on_image, qos_profile_sensor_data)
        if watch_cmd:  # another node drives: log its commands and, from policy_node, its chunks
            from mobile_vla.msg import ActionChunk

            node.create_subscription(Twist, "cmd_vel", lambda m: self._log("/cmd_vel", m), 10)
            node.create_subscription(ActionChunk, "/policy_node/action_chunk",
                                     lambda m: self._log("/policy_node/action_chunk", m), 10)
        self._track: list[tuple[float, float, float, float]] = []

    # --- subscriptions
    def _log(self, topic: str, msg) -> None:
        if self.log:
            self.log.write(topic, msg, int(self.sim_time * 1e9))

    def _on_episode(self, msg: String) -> None:
        self.episode = json.loads(msg.data)
        self._log("/sim_node/episode", msg)

    def _on_outcome(self, msg: String) -> None:
        self.outcomes.append(json.loads(msg.data))
        self._log("/sim_node/outcome", msg)

    def _on_pose(self, msg: PoseStamped) -> None:
        q = msg.pose.orientation
        yaw = 2.0 * math.atan2(q.z, q.w)
        t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        self.pose = (msg.pose.position.x, msg.pose.position.y, yaw)
        self._track.append((t, *self.pose))
        self._log("/pose", msg)

    def _on_clock(self, msg: Clock) -> None:
        self.sim_time = msg.clock.sec + msg.clock.nanosec * 1e-9

    def _on_image(self, msg: Image) -> None:
        self.images += 1
        self._log("/image", msg)

    # --- helpers
    def spin_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.01)
        return predicate()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """The simulator is up and both sides have matched (its first episode message arrived)."""
        return self.spin_until(
            lambda: self.episode is not None and self.reset_pub.get_subscription_count() > 0
            and self.cmd_pub.get_subscription_count() > 0, timeout)

    def sim_sleep(self, seconds: float, until=lambda: False) -> None:
        end = self.sim_time + seconds
        self.spin_until(lambda: self.sim_time >= end or until(), timeout=max(10.0, 20 * seconds))

    def reset(self, task: str, seed: int, timeout: float = 15.0) -> Layout:
        """Starts a new episode and returns its layout once the simulator confirmed it."""
        request = uuid.uuid4().hex  # resends of one request start one episode
        fresh = lambda: self.episode and self.episode.get("request") == request  # noqa: E731
        deadline = time.monotonic() + timeout
        while not fresh() and time.monotonic() < deadline:
            self.reset_pub.publish(String(data=json.dumps({"task": task, "seed": seed, "request": request})))
            self.spin_until(fresh, 1.0)
        if not fresh():
            raise TimeoutError(f"sim_node did not start {task} seed {seed} within {timeout} s")
        ep = self.episode
        if (ep["task"], ep["seed"]) != (task, seed):
            raise RuntimeError(f"sim_node started {ep['task']} seed {ep['seed']}, not {task} seed {seed}")
        self._track = []
        # A pose from the new episode, so the first decision sees the start pose.
        self.spin_until(lambda: self._track and self._track[-1][0] >= ep["stamp"], 5.0)
        return make_layout(task, seed)

    def send(self, cmd: tuple[float, float, float]) -> None:
        msg = twist(*cmd)
        self.cmd_pub.publish(msg)
        self._log("/cmd_vel", msg)

    def drive(self, policy, wall_timeout: float = 120.0) -> Rollout:
        """Runs `policy` (sim.policies) in the current episode until the simulator decides the outcome."""
        ep = self.episode
        done = lambda: any(o["episode"] == ep["episode"] for o in self.outcomes)  # noqa: E731
        presses = 0
        deadline = time.monotonic() + wall_timeout
        while not done() and time.monotonic() < deadline:
            if not getattr(policy, "drives", True):
                self.spin_until(done, deadline - time.monotonic())
                break
            key = policy.act(self.pose)
            if key is None:
                self.send((0.0, 0.0, 0.0))  # a live but idle driver keeps publishing zero
                self.sim_sleep(0.3, done)
                continue
            presses += 1
            self.send(KEYS[key])
            self.sim_sleep(PRESS_S, done)
            self.send((0.0, 0.0, 0.0))
            self.sim_sleep(RELEASE_S, done)
        if not done():
            raise TimeoutError(f"no outcome for episode {ep['episode']} within {wall_timeout} s of wall time")
        outcome = next(o for o in self.outcomes if o["episode"] == ep["episode"])
        return Rollout(ep, outcome, list(self._track), presses)


class RecorderClient:
    """recorder_node's services, called around each demonstration as an operator would: start with the
    instruction, let the expert drive, stop (saved) or, when the simulator says it failed, discard."""

    def __init__(self, sim: SimClient, name: str = "recorder_node"):
        from mobile_vla.srv import StartEpisode
        from std_srvs.srv import Trigger

        self.sim = sim
        self.StartEpisode, self.Trigger = StartEpisode, Trigger
        self.start = sim.node.create_client(StartEpisode, f"/{name}/start_episode")
        self.stop = sim.node.create_client(Trigger, f"/{name}/stop_episode")
        self.discard = sim.node.create_client(Trigger, f"/{name}/discard_episode")

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return self.sim.spin_until(lambda: self.start.service_is_ready() and self.stop.service_is_ready()
                                   and self.discard.service_is_ready(), timeout)

    def _call(self, client, request):
        fut = client.call_async(request)
        if not self.sim.spin_until(fut.done, 10.0):
            raise TimeoutError(f"{client.srv_name} did not answer within 10 s")
        return fut.result()

    def record(self, task: str, seed: int, episode_name: str) -> tuple[Rollout, bool]:
        from sim.policies import Expert

        layout = self.sim.reset(task, seed)
        self.sim.sim_sleep(0.2)  # a camera frame of the new scene reaches the recorder first
        resp = self._call(self.start, self.StartEpisode.Request(instruction=layout.instruction,
                                                                episode_name=episode_name))
        if not resp.success:
            raise RuntimeError(f"start_episode failed: {resp.message}")
        rollout = self.sim.drive(Expert(layout))
        ok = rollout.outcome["outcome"] == "success"
        resp = self._call(self.stop if ok else self.discard, self.Trigger.Request())
        if not resp.success:
            raise RuntimeError(f"{'stop' if ok else 'discard'}_episode failed: {resp.message}")
        return rollout, ok
