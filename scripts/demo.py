"""`make demo` (placeholder until the simulated end-to-end demo lands).

What it does today, for real: starts `echo_node` on a private ROS domain, publishes a
synthetic camera image and a velocity command from rclpy, and prints the
`mobile_vla/ActionChunk` that comes back. The full demo (record episodes in a MuJoCo
simulator, fine-tune, serve the policy) replaces this once the model and trainer land.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from geometry_msgs.msg import Twist
from mobile_vla.msg import ActionChunk
from sensor_msgs.msg import Image

DOMAIN = int(os.environ.get("MOBILE_VLA_DEMO_DOMAIN", "87"))
BIN = Path(os.environ.get("MOBILE_VLA_BIN_DIR", Path(__file__).resolve().parents[1] / "target/debug"))


def main() -> int:
    print("mobile_vla demo (placeholder): image + cmd_vel -> echo_node -> ActionChunk")
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    node = subprocess.Popen([str(BIN / "echo_node")], env=env)
    rclpy.init(domain_id=DOMAIN)
    client = rclpy.create_node("demo_client")
    got = []
    client.create_subscription(ActionChunk, "action_chunk", got.append, 10)
    img_pub = client.create_publisher(Image, "image", 10)
    cmd_pub = client.create_publisher(Twist, "cmd_vel_in", 10)
    cmd = Twist()
    cmd.linear.x, cmd.angular.z = 0.3, 0.2
    img = Image(width=4, height=4, encoding="rgb8", step=12, data=bytes(48))
    deadline = time.monotonic() + 30
    try:
        while not got and time.monotonic() < deadline:
            cmd_pub.publish(cmd)
            img.header.stamp = client.get_clock().now().to_msg()
            img_pub.publish(img)
            rclpy.spin_once(client, timeout_sec=0.2)
        if not got:
            print("no ActionChunk within 30 s", file=sys.stderr)
            return 1
        c = got[-1]
        print(f"ActionChunk: stamp={c.header.stamp.sec}.{c.header.stamp.nanosec:09d} "
              f"frame={c.header.frame_id} dt={c.dt:.2f}")
        for i, a in enumerate(c.actions):
            print(f"  [{i}] vx={a.linear.x:+.2f} vy={a.linear.y:+.2f} wz={a.angular.z:+.2f}")
        return 0
    finally:
        client.destroy_node()
        rclpy.shutdown()
        node.send_signal(signal.SIGINT)
        node.wait(10)


if __name__ == "__main__":
    sys.exit(main())
