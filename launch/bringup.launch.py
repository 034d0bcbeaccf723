"""The whole robot side: policy_node driving, recorder_node recording, trainer_node fine-tuning,
and policy_node reloading each model the trainer announces.

    ros2 launch mobile_vla bringup.launch.py model_dir:=$HOME/models/mobile_vla \
        image_topic:=/camera/image_raw cmd_vel_topic:=/cmd_vel_vla
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

SHARE = get_package_share_directory("mobile_vla")

# name: (default, description)
ARGS = {
    "model_dir": ("", "model directory policy_node serves and trainer_node fine-tunes from"),
    "dtype": ("f32", "policy weights: f32, or i16 (12-bit packed: faster, less memory)"),
    "namespace": ("", "namespace of every node and its relative topics (one per robot)"),
    "cmd_vel_topic": ("cmd_vel", "policy_node's command output, e.g. /cmd_vel_vla for twist_mux"),
    "teleop_cmd_vel_topic": ("cmd_vel_teleop", "the teleop commands recorder_node records"),
    "image_topic": ("image", "camera topic (sensor_msgs/Image)"),
    "use_sim_time": ("false", "true: use the simulator's /clock"),
    "params_file": (os.path.join(SHARE, "config", "policy_node.yaml"), "parameter file for policy_node"),
    "output_dir": ("episodes", "where episodes are recorded and automatic fine-tuning reads them"),
    "auto_finetune_after": ("0", "fine-tune after this many new episodes; 0 = only on request"),
    "follow_trainer": ("true", "policy_node reloads each model trainer_node announces"),
}


def include(name, **args):
    return IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(SHARE, "launch", name)),
        launch_arguments={k: LaunchConfiguration(v) for k, v in args.items()}.items(),
    )


def generate_launch_description():
    common = dict(namespace="namespace", image_topic="image_topic", use_sim_time="use_sim_time")
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=t) for n, (d, t) in ARGS.items()]
        + [
            include("policy.launch.py", model_dir="model_dir", dtype="dtype", cmd_vel_topic="cmd_vel_topic",
                    params_file="params_file", follow_trainer="follow_trainer", **common),
            include("train.launch.py", model_dir="model_dir", cmd_vel_topic="teleop_cmd_vel_topic",
                    output_dir="output_dir", auto_finetune_after="auto_finetune_after", **common),
        ]
    )
