"""Starts recorder_node with its YAML defaults from share/mobile_vla/config.

    ros2 launch mobile_vla record.launch.py image_topic:=/camera/image_raw \
        output_dir:=$HOME/episodes scenario:=1box_hori_left
    ros2 service call /recorder_node/start_episode mobile_vla/srv/StartEpisode "{instruction: 'go left'}"
    ros2 service call /recorder_node/stop_episode std_srvs/srv/Trigger
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

# name: (default, description); the defaults match config/recorder_node.yaml.
ARGS = {
    "image_topic": ("image", "camera topic (sensor_msgs/Image)"),
    "cmd_topic": ("cmd_vel", "velocity command topic (geometry_msgs/Twist)"),
    "instruction_topic": ("instruction", "language instruction topic (std_msgs/String)"),
    "output_dir": ("episodes", "where episodes (*.h5) are written; relative to the working dir"),
    "mode": ("event", "event: a frame per command change; rate: frames at rate_hz"),
    "scenario": ("", "appended to episode names, e.g. 1box_hori_left"),
}


def generate_launch_description():
    config = os.path.join(get_package_share_directory("mobile_vla"), "config", "recorder_node.yaml")
    # All are string parameters; value_type=str stops launch reading them as YAML
    # (scenario:=2 or output_dir:=2025 would otherwise reach the node as ints and kill it).
    overrides = {name: ParameterValue(LaunchConfiguration(name), value_type=str) for name in ARGS}
    return LaunchDescription(
        [
            DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in ARGS.items()
        ]
        + [
            Node(
                package="mobile_vla",
                executable="recorder_node",
                name="recorder_node",
                parameters=[config, overrides],
                output="screen",
            )
        ]
    )
