"""sim_node: the simulated robot as a ROS 2 node, talking the same topics as a real one.

    python -m sim.node --ros-args -p task:=red_box -p seed:=3      # from the repository root
    ros2 launch mobile_vla sim.launch.py task:=1box_hori_left       # installed package

Subscribes `cmd_vel` (geometry_msgs/Twist, robot frame; a command older than `cmd_timeout_s` counts as
zero, like a base driver's watchdog) and `~/reset` (std_msgs/String, JSON `{"task": ..., "seed": ...}`, with
an optional `request` id that is echoed in `~/episode`; a repeated id is ignored, so clients may resend).
Publishes `image` (sensor_msgs/Image bgr8, sensor-data QoS, `camera_rate_hz` of sim time), `instruction`
(std_msgs/String, transient-local), `pose` (geometry_msgs/PoseStamped, frame `map`), `/clock`
(sim time, for `use_sim_time`), `~/episode` (JSON: id, task, seed, instruction and the layout, which only
scripted experts and reports read; transient-local) and `~/outcome` (JSON: id, task, seed, `outcome` one of
success/collision/timeout/wrong_side/wrong_target, sim time, path length, final pose). The outcome is
judged from the base pose by the simulator alone; after it the base stands still until the next reset.

Sim time advances `1/physics_rate_hz` per step; steps are paced at `real_time_factor` × wall time (0 runs
as fast as the CPU allows). Images are small (`width`×`height`, 128² by default): the policy resizes to its
backbone's input anyway (224² for Kosmos-2), and small frames keep osmesa rendering, DDS and HDF5 cheap.
"""

from __future__ import annotations

import json
import math
import time

import rclpy
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped, Twist
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String

from sim.world import TASKS, World

PARAMS = {
    "task": "1box_hori_left",  # the first episode's task and seed
    "seed": 0,
    "width": 128,
    "height": 128,
    "camera_rate_hz": 10.0,
    "physics_rate_hz": 50.0,
    "real_time_factor": 1.0,
    "timeout_s": 20.0,  # sim time per episode
    "cmd_timeout_s": 1.0,  # 0 = commands never expire
}

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def stamp(t: float) -> Time:
    sec = int(t)
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)))


class SimNode(Node):
    def __init__(self):
        super().__init__("sim_node")
        # Dynamic typing, then cast: `timeout_s:=20` (an int on the command line) is a valid 20.0.
        for name, default in PARAMS.items():
            self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))
        try:
            p = {name: type(default)(self.get_parameter(name).value) for name, default in PARAMS.items()}
        except (TypeError, ValueError) as e:
            raise SystemExit(f"sim_node: bad parameter value: {e}") from e
        if p["task"] not in TASKS:
            raise SystemExit(f"sim_node: parameter task={p['task']!r} is not one of {', '.join(TASKS)}")
        if p["width"] <= 0 or p["height"] <= 0 or p["physics_rate_hz"] <= 0 or p["camera_rate_hz"] <= 0:
            raise SystemExit("sim_node: width, height, physics_rate_hz and camera_rate_hz must be > 0")
        self.p = p
        self.dt = 1.0 / p["physics_rate_hz"]
        self.camera_every = max(1, round(p["physics_rate_hz"] / p["camera_rate_hz"]))
        self.image_pub = self.create_publisher(Image, "image", qos_profile_sensor_data)
        self.instruction_pub = self.create_publisher(String, "instruction", LATCHED)
        self.pose_pub = self.create_publisher(PoseStamped, "pose", 10)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10)
        self.episode_pub = self.create_publisher(String, "~/episode", LATCHED)
        self.outcome_pub = self.create_publisher(String, "~/outcome", QoSProfile(depth=10))
        self.create_subscription(Twist, "cmd_vel", self.on_cmd, 10)
        self.create_subscription(String, "~/reset", self.on_reset, 10)
        self.t = 0.0  # sim time, monotonic across episodes
        self.episode_id = 0
        self.world: World | None = None
        self.cmd = (0.0, 0.0, 0.0)
        self.cmd_at = -math.inf
        self.request = None  # id of the last reset request served
        self.steps = 0
        self.render_s = 0.0
        self.frames = 0
        self.reset(p["task"], int(p["seed"]))

    def on_cmd(self, msg: Twist) -> None:
        self.cmd = (msg.linear.x, msg.linear.y, msg.angular.z)
        self.cmd_at = self.t

    def on_reset(self, msg: String) -> None:
        try:
            req = json.loads(msg.data)
            if req.get("request") is not None and req["request"] == self.request:
                return  # a resend of the request already served
            self.request = req.get("request")
            self.reset(str(req["task"]), int(req["seed"]))
        except (ValueError, KeyError, TypeError) as e:
            self.get_logger().error(f"bad reset request {msg.data!r}: {e} (want {{\"task\": ..., \"seed\": ...}})")

    def reset(self, task: str, seed: int) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        if self.world:
            self.world.close()
        self.world = World(task, seed, self.p["width"], self.p["height"], self.p["timeout_s"])
        self.episode_id += 1
        self.episode_t0 = self.t
        self.cmd, self.cmd_at = (0.0, 0.0, 0.0), -math.inf
        lay = self.world.layout
        self.instruction_pub.publish(String(data=lay.instruction))
        info = {"episode": self.episode_id, "request": self.request, "task": task, "seed": seed,
                "instruction": lay.instruction,
                "stamp": self.t, "layout": lay.to_json()}
        self.episode_pub.publish(String(data=json.dumps(info)))
        self.get_logger().info(f"episode {self.episode_id}: {task} seed {seed}: {lay.instruction!r}")
        self.publish_camera()

    def step(self) -> None:
        w = self.world
        stale = self.p["cmd_timeout_s"] > 0 and self.t - self.cmd_at > self.p["cmd_timeout_s"]
        cmd = (0.0, 0.0, 0.0) if stale else self.cmd
        decided = w.outcome is not None
        w.step(self.dt, *cmd)
        self.t += self.dt
        self.steps += 1
        self.clock_pub.publish(Clock(clock=stamp(self.t)))
        if w.outcome and not decided:
            x, y, yaw = w.pose
            result = {"episode": self.episode_id, "task": w.layout.task, "seed": w.layout.seed,
                      "outcome": w.outcome, "time_s": round(w.t, 3), "path_length": round(w.judge.path_length, 3),
                      "side": w.judge.side, "final_pose": [x, y, yaw], "stamp": self.t,
                      "render_fps": round(self.frames / self.render_s, 1) if self.render_s else None}
            self.outcome_pub.publish(String(data=json.dumps(result)))
            self.get_logger().info(f"episode {self.episode_id}: {w.outcome} after {w.t:.1f} s")
        if self.steps % self.camera_every == 0:
            self.publish_camera()

    def publish_camera(self) -> None:
        w = self.world
        now = stamp(self.t)
        x, y, yaw = w.pose
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = now, "map"
        pose.pose.position.x, pose.pose.position.y = x, y
        pose.pose.orientation.z, pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
        self.pose_pub.publish(pose)
        if self.image_pub.get_subscription_count() == 0:
            return  # nobody looks: skip the rendering
        t0 = time.perf_counter()
        bgr = w.render_bgr()
        self.render_s += time.perf_counter() - t0
        self.frames += 1
        img = Image(height=bgr.shape[0], width=bgr.shape[1], encoding="bgr8", step=bgr.shape[1] * 3)
        img.header.stamp, img.header.frame_id = now, "camera"
        img.data = bgr.tobytes()
        self.image_pub.publish(img)


def main() -> None:
    rclpy.init()
    node = SimNode()
    rtf = node.p["real_time_factor"]
    period = node.dt / rtf if rtf > 0 else 0.0
    next_tick = time.monotonic()
    try:
        while rclpy.ok():
            # Serve callbacks until the next step is due, then step (catching up if rendering lagged).
            rclpy.spin_once(node, timeout_sec=max(0.0, next_tick - time.monotonic()))
            if time.monotonic() >= next_tick:
                node.step()
                next_tick = max(next_tick + period, time.monotonic() - 0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # SIGINT/SIGTERM: a clean stop
    finally:
        node.world.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
