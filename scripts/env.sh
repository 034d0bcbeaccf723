# shellcheck shell=bash
# Source me (after scripts/setup.sh): the environment to build, test and run mobile_vla
# from this checkout, over either the wheel-based ROS prefix or a sourced /opt/ros.
_mv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# r2r generates Rust types for exactly these interface packages (ours + what it uses);
# the same list is in CMakeLists.txt so both builds share r2r's cache.
export IDL_PACKAGE_FILTER="mobile_vla;std_msgs;geometry_msgs;sensor_msgs;std_srvs;builtin_interfaces;action_msgs;unique_identifier_msgs;lifecycle_msgs;diagnostic_msgs;rosgraph_msgs"
_mv_ros="${MOBILE_VLA_ROS_DIR:-$HOME/.cache/mobile_vla/ros-jazzy}"
if [ -f "$_mv_ros/jazzy.env" ] && { [ -z "${ROS_DISTRO:-}" ] || [ -n "${JAZZY_VENV:-}" ]; }; then
  # shellcheck disable=SC1091
  . "$_mv_ros/jazzy.env"
fi
# shellcheck disable=SC1091
. "$_mv_root/install/share/mobile_vla/local_setup.bash"
# DDS stays on loopback; tests pick their own ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
unset _mv_root _mv_ros
