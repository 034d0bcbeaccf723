"""Starts policy_node (a managed node) beside a nav stack.

    ros2 launch mobile_vla policy.launch.py model_dir:=$HOME/models/mobile_vla \
        image_topic:=/camera/image_raw cmd_vel_topic:=/cmd_vel_vla
    ros2 topic pub -1 -t 1 --qos-durability transient_local /instruction std_msgs/String "{data: 'go to the cup'}"

With autostart:=false the node waits unconfigured for `ros2 lifecycle set /policy_node configure`
(loads the model) and `activate` (drives), or for nav2's lifecycle_manager.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

CONFIG = os.path.join(get_package_share_directory("mobile_vla"), "config", "policy_node.yaml")

# name: (default, description)
ARGS = {
    "model_dir": ("", "model directory to serve (config.json, policy.json, model.safetensors, tokenizer.json)"),
    "dtype": ("f32", "weight format: f32, or i16 (12-bit packed: faster, less memory)"),
    "namespace": ("", "namespace of the node and its relative topics (one per robot)"),
    "cmd_vel_topic": ("cmd_vel", "velocity command output, e.g. /cmd_vel_vla for twist_mux"),
    "image_topic": ("image", "camera topic (sensor_msgs/Image)"),
    "use_sim_time": ("false", "true: use the simulator's /clock"),
    "params_file": (CONFIG, "parameter file for policy_node (limits, execution mode, topics)"),
    "autostart": ("true", "configure and activate at start; false: wait for lifecycle transitions"),
    "follow_trainer": ("false", "reload each model trainer_node announces on its model_ready topic"),
}


def generate_launch_description():
    arg = LaunchConfiguration
    overrides = {
        "model_dir": ParameterValue(arg("model_dir"), value_type=str),
        "dtype": ParameterValue(arg("dtype"), value_type=str),
        "autostart": ParameterValue(arg("autostart"), value_type=bool),
        "use_sim_time": ParameterValue(arg("use_sim_time"), value_type=bool),
        "follow_trainer": ParameterValue(arg("follow_trainer"), value_type=bool),
    }
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=t) for n, (d, t) in ARGS.items()]
        + [
            Node(
                package="mobile_vla",
                executable="policy_node",
                name="policy_node",
                namespace=arg("namespace"),
                parameters=[arg("params_file"), overrides],
                remappings=[("cmd_vel", arg("cmd_vel_topic")), ("image", arg("image_topic"))],
                output="screen",
            )
        ]
    )
