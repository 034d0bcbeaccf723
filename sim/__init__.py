"""The simulated robot for `make demo` and the integration tests.

- `world`: seeded arenas (coloured boxes, a cup), the holonomic base's kinematics, collisions and the
  episode outcome judged from the base pose, the forward camera rendered by MuJoCo offscreen (osmesa).
- `node`: `sim_node`, the world behind the topics a real robot has (`cmd_vel` in; `image`, `instruction`,
  `pose`, `/clock` out) plus `~/reset`, `~/episode` and `~/outcome`.
- `policies`: keyboard-style drivers: the scripted expert and the zero and random baselines.
- `client`: the rclpy side: reset, drive an episode, collect outcome and track, call recorder_node.
- `mcap_log`: rollouts as ros2-profile MCAP files (Foxglove, `ros2 bag`).
"""
