#!/usr/bin/env bash
# Builds this package the way a user with a ROS 2 install does: a colcon workspace,
# `colcon build`, then `ros2 run`-style use of the installed executables.
# Here ROS comes from the wheel prefix (make colcon-check sources it); on a machine
# with /opt/ros/<distro> sourced the same steps apply unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ws="${COLCON_WS:-$HOME/.cache/mobile_vla/colcon_ws}"
if [ -z "${ROS_DISTRO:-}" ]; then
  # shellcheck disable=SC1091
  . "${MOBILE_VLA_ROS_DIR:-$HOME/.cache/mobile_vla/ros-jazzy}/jazzy.env"
fi
python3 -c "import colcon_core" 2>/dev/null || python3 -m pip install -q colcon-core colcon-ros colcon-cmake
mkdir -p "$ws/src"
ln -sfn "$root" "$ws/src/mobile_vla"
cd "$ws"
time colcon build --event-handlers console_direct+ --cmake-args -DBUILD_TESTING=OFF
# colcon's setup scripts read unset variables.
set +u
# shellcheck disable=SC1091
. install/setup.sh
set -u
test -x install/mobile_vla/lib/mobile_vla/echo_node
test -f install/mobile_vla/share/mobile_vla/config/echo_node.yaml
python3 -c "from mobile_vla.msg import ActionChunk; print('rclpy imports', ActionChunk.__name__)"
echo "colcon-check: OK ($ws/install)"
