"""Starts recorder_node and trainer_node: record demonstrations, then fine-tune on request or
automatically after `auto_finetune_after` new episodes.

    ros2 launch mobile_vla train.launch.py model_dir:=$HOME/models/mobile_vla \
        image_topic:=/camera/image_raw output_dir:=$HOME/episodes auto_finetune_after:=10
    ros2 action send_goal -f /trainer_node/finetune mobile_vla/action/Finetune \
        "{dataset_dir: $HOME/episodes, config: $HOME/ws/src/mobile_vla/config/on_device_full_ft.yaml}"

Each finished model is announced on /trainer_node/model_ready (policy_node follows it with follow_trainer).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

SHARE = get_package_share_directory("mobile_vla")

# name: (default, description)
ARGS = {
    "model_dir": ("", "model to fine-tune from (automatic jobs, goals without init_model_dir)"),
    "namespace": ("", "namespace of both nodes and their relative topics (one per robot)"),
    "image_topic": ("image", "camera topic recorded (sensor_msgs/Image)"),
    "cmd_vel_topic": ("cmd_vel", "velocity commands recorded (your teleop's output)"),
    "use_sim_time": ("false", "true: use the simulator's /clock"),
    "params_file": (os.path.join(SHARE, "config", "trainer_node.yaml"), "parameter file for trainer_node"),
    "output_dir": ("episodes", "where recorder_node writes episodes, and what automatic jobs train on"),
    "auto_finetune_after": ("0", "fine-tune after this many new episodes; 0 = only on request"),
}


def generate_launch_description():
    arg = LaunchConfiguration
    sim = ParameterValue(arg("use_sim_time"), value_type=bool)
    recorder = Node(
        package="mobile_vla",
        executable="recorder_node",
        name="recorder_node",
        namespace=arg("namespace"),
        parameters=[
            os.path.join(SHARE, "config", "recorder_node.yaml"),
            {"output_dir": ParameterValue(arg("output_dir"), value_type=str), "use_sim_time": sim},
        ],
        remappings=[("image", arg("image_topic")), ("cmd_vel", arg("cmd_vel_topic"))],
        output="screen",
    )
    trainer = Node(
        package="mobile_vla",
        executable="trainer_node",
        name="trainer_node",
        namespace=arg("namespace"),
        parameters=[
            arg("params_file"),
            {
                "auto_dataset_dir": ParameterValue(arg("output_dir"), value_type=str),
                "auto_init_model_dir": ParameterValue(arg("model_dir"), value_type=str),
                "auto_finetune_after": ParameterValue(arg("auto_finetune_after"), value_type=int),
                # Relative: recorder_node's status in the same namespace.
                "recorder_status_topic": "recorder_node/status",
                "use_sim_time": sim,
            },
        ],
        output="screen",
    )
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=t) for n, (d, t) in ARGS.items()]
        + [recorder, trainer]
    )
