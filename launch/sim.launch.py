"""Starts the simulated robot (sim_node, from share/mobile_vla/sim) for the demo or for trying nodes.

    ros2 launch mobile_vla sim.launch.py task:=red_box seed:=3 real_time_factor:=1.0
    ros2 topic pub --once /sim_node/reset std_msgs/String "{data: '{\"task\": \"blue_box\", \"seed\": 4}'}"
    ros2 topic echo /sim_node/outcome

It publishes `image`, `instruction`, `pose` and `/clock` and drives from `cmd_vel`, the topics a real
robot has: recorder_node and policy_node run against it unchanged (with use_sim_time:=true where sim
time matters). Needs `mujoco` (pip) and libosmesa6: `bash scripts/setup.sh sim`.
"""

import os
import sys

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

# name: (default, description); the defaults match sim/node.py's PARAMS.
ARGS = {
    "task": ("1box_hori_left", "first episode's task: 1box_hori_left, 1box_hori_right, red_box, blue_box"),
    "seed": ("0", "first episode's layout seed"),
    "width": ("128", "camera width [px]"),
    "height": ("128", "camera height [px]"),
    "real_time_factor": ("1.0", "sim time per wall time (0 = as fast as possible)"),
    "timeout_s": ("20.0", "episode time limit [s of sim time]"),
}


def generate_launch_description():
    share = get_package_share_directory("mobile_vla")
    params = []
    for name in ARGS:
        params += ["-p", [f"{name}:=", LaunchConfiguration(name)]]
    return LaunchDescription(
        [
            DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in ARGS.items()
        ]
        + [
            ExecuteProcess(
                cmd=[sys.executable, "-m", "sim.node", "--ros-args", "-r", "__node:=sim_node", *params],
                additional_env={"PYTHONPATH": share + os.pathsep + os.environ.get("PYTHONPATH", "")},
                name="sim_node",
                output="screen",
            )
        ]
    )
