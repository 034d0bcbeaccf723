"""The simulated world without ROS: seeded layouts, the holonomic base's kinematics, collision and
outcome judging from the base pose, and the forward camera (MuJoCo, offscreen).

Coordinates: metres, the robot starts near the origin facing +x; +y is the robot's left.
Two task families share a scene per seed, so that only the instruction tells the answer:
- `1box_hori_left` / `1box_hori_right`: a box stands between the robot and a cup; pass the box on
  the named side and reach the cup (the Mobile VLA fork's scenarios and instruction text).
- `red_box` / `blue_box`: a red and a blue box, on random sides; drive up to the named one.
One more family is for pretraining only (`make study` trains a backbone on it first, as a robot's VLM comes
pretrained on other data): `go_to_cup`, a cup on a random side and a box of a random colour on the other.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("MUJOCO_GL", "osmesa")  # offscreen on the CPU; before mujoco is imported
import mujoco  # noqa: E402

TASKS = {
    "1box_hori_left": "Navigate around the obstacle on the left side and reach the cup",
    "1box_hori_right": "Navigate around the obstacle on the right side and reach the cup",
    "red_box": "Go to the red box",
    "blue_box": "Go to the blue box",
    "go_to_cup": "Go to the cup",
}
# Episode outcomes. Only `success` counts; the others say why an episode failed.
OUTCOMES = ("success", "collision", "timeout", "wrong_side", "wrong_target")

ROBOT_RADIUS = 0.17
REACH_CUP = 0.30  # base centre within this of the cup: reached
REACH_BOX = 0.25  # base centre within this of a box's face (plus the robot's radius): reached
ARENA = (-0.8, 3.4, -1.5, 1.5)  # x_min, x_max, y_min, y_max (inner faces of the walls)
MAX_LINEAR, MAX_ANGULAR = 1.2, 1.5  # the base's limits [m/s], [rad/s]
RGBA = {
    "red": (0.85, 0.1, 0.1, 1),
    "blue": (0.1, 0.2, 0.85, 1),
    "obstacle": (0.55, 0.4, 0.25, 1),
    "cup": (0.1, 0.75, 0.2, 1),
}


@dataclass
class Box:
    name: str  # "obstacle", "red", "blue"
    x: float
    y: float
    hx: float  # half sizes
    hy: float
    hz: float = 0.2

    def face_distance(self, x: float, y: float) -> float:
        """Distance from a point to the box's footprint (0 inside)."""
        dx = max(abs(x - self.x) - self.hx, 0.0)
        dy = max(abs(y - self.y) - self.hy, 0.0)
        return math.hypot(dx, dy)


@dataclass
class Layout:
    task: str
    seed: int
    start: tuple[float, float, float]  # x, y, yaw
    boxes: list[Box]
    cup: tuple[float, float] | None = None

    @property
    def instruction(self) -> str:
        return TASKS[self.task]

    def box(self, name: str) -> Box:
        return next(b for b in self.boxes if b.name == name)

    def to_json(self) -> dict:
        return {
            "start": list(self.start),
            "boxes": [vars(b) for b in self.boxes],
            "cup": list(self.cup) if self.cup else None,
            "arena": list(ARENA),
        }


def family(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    return "1box" if task.startswith("1box") else "cup" if task == "go_to_cup" else "color"


def make_layout(task: str, seed: int) -> Layout:
    """The scene for `seed`: the same for both tasks of a family (left/right, red/blue)."""
    fam = family(task)
    rng = np.random.default_rng([seed, 0 if fam == "1box" else 1])
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    start = (u(-0.1, 0.1), u(-0.15, 0.15), u(-0.15, 0.15))
    if fam == "1box":
        box = Box("obstacle", u(1.0, 1.3), u(-0.12, 0.12), u(0.12, 0.2), u(0.25, 0.38))
        cup = (box.x + u(0.9, 1.3), u(-0.2, 0.2))
        return Layout(task, seed, start, [box], cup)
    if fam == "cup":
        side = 1.0 if rng.integers(2) else -1.0
        colour = ["red", "blue", "obstacle"][int(rng.integers(3))]
        box = Box(colour, u(1.0, 2.2), -side * u(0.5, 0.9), u(0.12, 0.18), u(0.12, 0.18))
        return Layout(task, seed, start, [box], (u(1.3, 2.5), side * u(0.3, 1.0)))
    # Far enough ahead that both boxes stand well inside the camera's view (closer, they sit at its edges,
    # a pixel or two wide at the model's input size), and tall, so that their colours fill whole patches.
    bx = [u(2.2, 2.7), u(2.2, 2.7)]
    # Far enough to the sides that driving straight on reaches neither box: only a committed move does.
    by = [u(0.9, 1.1), -u(0.9, 1.1)]
    red_left = bool(rng.integers(2))
    sizes = [(u(0.14, 0.2), u(0.16, 0.22)) for _ in range(2)]
    names = ["red", "blue"] if red_left else ["blue", "red"]
    boxes = [Box(n, x, y, hx, hy, 0.4) for n, x, y, (hx, hy) in zip(names, bx, by, sizes)]
    return Layout(task, seed, start, boxes)


def _mjcf(layout: Layout, width: int, height: int) -> str:
    x0, x1, y0, y1 = ARENA
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    t = 0.05  # wall half thickness
    walls = [
        (cx, y1 + t, hx + 2 * t, t, "0.75 0.75 0.7 1"),  # left wall, warm grey
        (cx, y0 - t, hx + 2 * t, t, "0.65 0.7 0.75 1"),  # right wall, cool grey
        (x1 + t, cy, t, hy, "0.8 0.8 0.8 1"),
        (x0 - t, cy, t, hy, "0.8 0.8 0.8 1"),
    ]
    geoms = [
        f'<geom name="wall{i}" type="box" pos="{x} {y} 0.25" size="{sx} {sy} 0.25" rgba="{c}"/>'
        for i, (x, y, sx, sy, c) in enumerate(walls)
    ]
    for b in layout.boxes:
        rgba = " ".join(map(str, RGBA[b.name]))
        geoms.append(
            f'<geom name="{b.name}" type="box" pos="{b.x} {b.y} {b.hz}" size="{b.hx} {b.hy} {b.hz}" rgba="{rgba}"/>'
        )
    if layout.cup:
        rgba = " ".join(map(str, RGBA["cup"]))
        geoms.append(
            f'<geom name="cup" type="cylinder" pos="{layout.cup[0]} {layout.cup[1]} 0.1" size="0.06 0.1" '
            f'rgba="{rgba}" contype="0" conaffinity="0"/>'
        )
    return f"""<mujoco model="mobile_vla_arena">
  <visual><global offwidth="{width}" offheight="{height}"/><quality shadowsize="0"/>
    <headlight ambient="0.35 0.35 0.35"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.42 0.42 0.45" rgb2="0.5 0.5 0.53" width="64" height="64"/>
    <material name="floor" texture="grid" texrepeat="8 8"/>
  </asset>
  <worldbody>
    <light directional="true" pos="0 0 4" dir="0.2 0.1 -1" diffuse="0.7 0.7 0.7"/>
    <geom name="floor" type="plane" pos="{cx} {cy} 0" size="{hx + 0.2} {hy + 0.2} 0.1" material="floor"
          contype="0" conaffinity="0"/>
    {chr(10).join("    " + g for g in geoms)}
    <body name="base" pos="0 0 0.08">
      <joint name="x" type="slide" axis="1 0 0"/>
      <joint name="y" type="slide" axis="0 1 0"/>
      <joint name="yaw" type="hinge" axis="0 0 1"/>
      <geom name="base" type="cylinder" size="{ROBOT_RADIUS} 0.06" rgba="0.2 0.2 0.2 1"/>
      <camera name="front" pos="{ROBOT_RADIUS} 0 0.2" xyaxes="0 -1 0 0.15 0 1" fovy="75"/>
    </body>
  </worldbody>
</mujoco>"""


@dataclass
class Judge:
    """Outcome of an episode from the base's pose alone (never from the policy)."""

    layout: Layout
    timeout_s: float
    side: str | None = None  # the side the obstacle was passed on, once alongside it
    path_length: float = 0.0
    _last: tuple[float, float] | None = field(default=None, repr=False)

    def update(self, t: float, x: float, y: float, collided: bool) -> str | None:
        if self._last:
            self.path_length += math.hypot(x - self._last[0], y - self._last[1])
        self._last = (x, y)
        lay = self.layout
        if collided:
            return "collision"
        if family(lay.task) == "cup":
            if math.hypot(x - lay.cup[0], y - lay.cup[1]) < REACH_CUP:
                return "success"
        elif lay.cup is not None:
            box = lay.boxes[0]
            if self.side is None and abs(x - box.x) <= box.hx:
                self.side = "left" if y > box.y else "right"
            if math.hypot(x - lay.cup[0], y - lay.cup[1]) < REACH_CUP:
                want = "left" if lay.task.endswith("left") else "right"
                return "success" if self.side == want else "wrong_side"
        else:
            want = lay.task.split("_")[0]
            for b in lay.boxes:
                if b.face_distance(x, y) < ROBOT_RADIUS + REACH_BOX:
                    return "success" if b.name == want else "wrong_target"
        if t >= self.timeout_s:
            return "timeout"
        return None


class World:
    """One episode's scene: step the base with a velocity command, render the camera."""

    def __init__(self, task: str, seed: int, width: int = 128, height: int = 128, timeout_s: float = 20.0):
        self.layout = make_layout(task, seed)
        self.model = mujoco.MjModel.from_xml_string(_mjcf(self.layout, width, height))
        self.data = mujoco.MjData(self.model)
        self._base_geom = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, "base")
        self.width, self.height = width, height
        self._renderer: mujoco.Renderer | None = None
        self.t = 0.0
        self.judge = Judge(self.layout, timeout_s)
        self.outcome: str | None = None
        self.data.qpos[:3] = self.layout.start
        mujoco.mj_forward(self.model, self.data)

    @property
    def pose(self) -> tuple[float, float, float]:
        """x, y, yaw of the base (its joints' positions)."""
        q = self.data.qpos
        return float(q[0]), float(q[1]), float(q[2])

    def collided(self) -> bool:
        c = self.data.contact[: self.data.ncon]
        return bool(np.any((c.geom1 == self._base_geom) | (c.geom2 == self._base_geom)))

    def step(self, dt: float, vx: float, vy: float, wz: float) -> str | None:
        """Moves the base for `dt` at the command (robot frame, clamped to the base's limits) and
        returns the episode's outcome once decided (then the base no longer moves)."""
        if self.outcome:
            return self.outcome
        speed = math.hypot(vx, vy)
        if speed > MAX_LINEAR:
            vx, vy = vx * MAX_LINEAR / speed, vy * MAX_LINEAR / speed
        wz = max(-MAX_ANGULAR, min(MAX_ANGULAR, wz))
        _, _, yaw = self.pose
        c, s = math.cos(yaw), math.sin(yaw)
        q = self.data.qpos
        q[0] += (c * vx - s * vy) * dt
        q[1] += (s * vx + c * vy) * dt
        q[2] += wz * dt
        self.t += dt
        mujoco.mj_forward(self.model, self.data)
        x, y, _ = self.pose
        self.outcome = self.judge.update(self.t, x, y, self.collided())
        return self.outcome

    def render_bgr(self) -> np.ndarray:
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera="front")
        return np.ascontiguousarray(self._renderer.render()[:, :, ::-1])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
