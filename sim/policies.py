"""Keyboard-style drivers for the simulator: the scripted expert and the zero and random baselines.

Every policy answers with key presses as the Mobile VLA fork's keyboard collector sends them: a fixed
velocity held for `PRESS_S`, then released to zero (piecewise constant commands, one `start_action` and
one `stop_action` frame per press in recorder_node's event mode). The expert plans on the layout the
simulator publishes on `~/episode` (privileged, as a human teleoperator sees the room); baselines ignore it.
"""

from __future__ import annotations

import math

import numpy as np

from sim.world import ROBOT_RADIUS, Layout, family

SPEED = 0.5  # m/s per key (diagonals move on both axes)
TURN = 0.6  # rad/s
PRESS_S = 0.4  # how long a key press drives, as the fork's collector
RELEASE_S = 0.1  # pause with zero command between presses
# Key -> (vx, vy, wz) in the robot frame, the layout of a WASD teleop.
KEYS = {
    "w": (SPEED, 0.0, 0.0),
    "s": (-SPEED, 0.0, 0.0),
    "a": (0.0, SPEED, 0.0),
    "d": (0.0, -SPEED, 0.0),
    "q": (SPEED, SPEED, 0.0),
    "e": (SPEED, -SPEED, 0.0),
    "z": (-SPEED, SPEED, 0.0),
    "c": (-SPEED, -SPEED, 0.0),
    "r": (0.0, 0.0, TURN),
    "t": (0.0, 0.0, -TURN),
}
MOVES = [k for k, (_, _, wz) in KEYS.items() if wz == 0.0]


class Expert:
    """Waypoints around the obstacle on the instructed side (or to the named box's front), each press
    the translation key pointing closest to the next waypoint; turns back when the heading drifts."""

    name = "expert"
    clearance = 0.22  # gap kept between the robot's hull and a box

    def __init__(self, layout: Layout):
        self.waypoints = self.plan(layout)

    def plan(self, lay: Layout) -> list[tuple[float, float]]:
        if family(lay.task) == "cup":  # the box stands on the other side: straight to the cup
            return [lay.cup]
        if lay.cup is not None:
            b = lay.boxes[0]
            s = 1.0 if lay.task.endswith("left") else -1.0
            y = b.y + s * (b.hy + ROBOT_RADIUS + self.clearance)
            return [(b.x - b.hx - 0.25, y), (b.x + b.hx + 0.1, y), lay.cup]
        b = lay.box(lay.task.split("_")[0])
        return [(b.x - b.hx - ROBOT_RADIUS - 0.15, b.y)]

    def act(self, pose: tuple[float, float, float]) -> str | None:
        x, y, yaw = pose
        while len(self.waypoints) > 1 and math.hypot(self.waypoints[0][0] - x, self.waypoints[0][1] - y) < 0.15:
            self.waypoints.pop(0)
        if abs(yaw) > 0.25:
            return "t" if yaw > 0 else "r"
        wx, wy = self.waypoints[0]
        # Direction to the waypoint in the robot frame, snapped to the nearest of the 8 moves.
        c, s = math.cos(yaw), math.sin(yaw)
        dx, dy = c * (wx - x) + s * (wy - y), -s * (wx - x) + c * (wy - y)
        want = math.atan2(dy, dx)
        return min(MOVES, key=lambda k: abs(_wrap(math.atan2(KEYS[k][1], KEYS[k][0]) - want)))


class Zero:
    """Never moves (what an untrained or dead policy does)."""

    name = "zero"

    def __init__(self, layout: Layout):
        pass

    def act(self, pose) -> str | None:
        return None


class Random:
    """Presses a uniformly random key (moves and turns) each time."""

    name = "random"

    def __init__(self, layout: Layout, rng: np.random.Generator | None = None):
        self.rng = rng or np.random.default_rng(layout.seed + 10_000)

    def act(self, pose) -> str | None:
        return str(self.rng.choice(list(KEYS)))


class External:
    """Another node drives (policy_node on `cmd_vel`); the client only watches and logs."""

    name = "policy"
    drives = False

    def __init__(self, layout: Layout):
        pass


POLICIES = {p.name: p for p in (Expert, Zero, Random)}


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi
