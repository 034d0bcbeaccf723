"""echo_node, started as a real process, talked to from rclpy over a real DDS graph."""

import signal

from conftest import spin_until


def make_image(stamp_sec, stamp_nsec, encoding="bgr8"):
    from sensor_msgs.msg import Image

    img = Image()
    img.header.stamp.sec = stamp_sec
    img.header.stamp.nanosec = stamp_nsec
    img.header.frame_id = "camera"
    img.width, img.height, img.encoding = 2, 2, encoding
    img.step = 8  # 6 bytes of pixels + 2 bytes padding per row
    img.data = bytes(range(16))
    return img


def test_image_and_twist_become_an_action_chunk(start_node, rclpy_node):
    from geometry_msgs.msg import Twist
    from mobile_vla.msg import ActionChunk
    from rcl_interfaces.srv import GetParameters
    from sensor_msgs.msg import Image

    node = start_node("echo_node", "--ros-args", "-p", "chunk_len:=3", "-p", "frame_id:=test_base")
    chunks = []
    rclpy_node.create_subscription(ActionChunk, "action_chunk", chunks.append, 10)
    img_pub = rclpy_node.create_publisher(Image, "image", 10)
    cmd_pub = rclpy_node.create_publisher(Twist, "cmd_vel_in", 10)
    assert spin_until(
        rclpy_node,
        lambda: img_pub.get_subscription_count() > 0 and cmd_pub.get_subscription_count() > 0,
    ), f"echo_node never subscribed:\n{node.output()}"

    # Command overrides reached the typed parameters, visible through the parameter service.
    client = rclpy_node.create_client(GetParameters, "/echo_node/get_parameters")
    assert client.wait_for_service(timeout_sec=10)
    fut = client.call_async(GetParameters.Request(names=["chunk_len", "image_topic", "dt"]))
    assert spin_until(rclpy_node, fut.done)
    values = fut.result().values
    assert (values[0].integer_value, values[1].string_value) == (3, "image")
    assert abs(values[2].double_value - 0.1) < 1e-9

    twist = Twist()
    twist.linear.x, twist.linear.y, twist.angular.z = 0.5, -0.25, 1.0
    # Our side may see the match before the node does; a reliable volatile message sent
    # before that is lost, so repeat the command for a second, as a teleop would.
    for _ in range(10):
        cmd_pub.publish(twist)
        spin_until(rclpy_node, lambda: False, timeout=0.1)

    # The image publisher keeps sending until a chunk for its stamp comes back
    # (best-effort image QoS may drop the first frames while matching settles).
    def got(sec):
        return [c for c in chunks if c.header.stamp.sec == sec]

    for _ in range(40):
        img_pub.publish(make_image(123, 456))
        if spin_until(rclpy_node, lambda: got(123), timeout=0.25):
            break
    assert got(123), f"no ActionChunk received:\n{node.output()}"
    chunk = got(123)[0]
    assert chunk.header.stamp.nanosec == 456
    assert chunk.header.frame_id == "test_base"
    assert abs(chunk.dt - 0.1) < 1e-6
    assert len(chunk.actions) == 3
    for a in chunk.actions:
        assert (a.linear.x, a.linear.y, a.angular.z) == (0.5, -0.25, 1.0)
        assert (a.linear.z, a.angular.x, a.angular.y) == (0.0, 0.0, 0.0)

    # A malformed image is rejected with a message naming the field; the node lives on.
    img_pub.publish(make_image(7, 0, encoding="yuv422"))
    bad = make_image(8, 0)
    bad.step = 5  # smaller than width * 3
    img_pub.publish(bad)
    spin_until(rclpy_node, lambda: False, timeout=1.0)
    assert not got(7) and not got(8)
    for _ in range(40):
        img_pub.publish(make_image(200, 0, encoding="rgb8"))
        if spin_until(rclpy_node, lambda: got(200), timeout=0.25):
            break
    assert got(200), f"node stopped answering after bad input:\n{node.output()}"
    assert node.alive()
    out = node.output()
    assert "yuv422" in out and "`encoding`" in out
    assert "`step`" in out

    # SIGINT: clean exit, no crash in rcl/DDS teardown.
    assert node.stop(signal.SIGINT) == 0, node.output()
    assert "stopped cleanly" in node.output()


def test_sigterm_stops_cleanly(start_node, rclpy_node):
    from mobile_vla.msg import ActionChunk

    node = start_node("echo_node")
    sub = rclpy_node.create_subscription(ActionChunk, "action_chunk", lambda _: None, 10)
    assert spin_until(rclpy_node, lambda: rclpy_node.count_publishers("action_chunk") > 0)
    del sub
    assert node.stop(signal.SIGTERM) == 0, node.output()
    assert "SIGTERM received" in node.output()


def test_bad_parameter_type_is_reported(start_node):
    node = start_node("echo_node", "--ros-args", "-p", "chunk_len:=many")
    node.proc.wait(timeout=20)
    assert node.proc.returncode != 0
    assert "chunk_len" in node.output()
