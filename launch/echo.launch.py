"""Starts echo_node with its YAML defaults from share/mobile_vla/config.

    ros2 launch mobile_vla echo.launch.py [image_topic:=/camera/image_raw]
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    config = os.path.join(get_package_share_directory("mobile_vla"), "config", "echo_node.yaml")
    # value_type=str: launch would otherwise read the argument as YAML
    # (image_topic:=1 would reach the node as an int, which it rejects).
    image_topic = ParameterValue(LaunchConfiguration("image_topic"), value_type=str)
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "image_topic", default_value="image", description="camera topic (sensor_msgs/Image)"
            ),
            Node(
                package="mobile_vla",
                executable="echo_node",
                name="echo_node",
                parameters=[config, {"image_topic": image_topic}],
                output="screen",
            ),
        ]
    )
