"""`make demo`: record → inspect → serve, end to end on embedded defaults.

1. Record: starts `recorder_node` on a private ROS domain; an rclpy "robot" publishes a
   synthetic camera (a box in front of the robot that shifts as it turns), an instruction
   and a scripted teleop drive on /cmd_vel; the episode is started and stopped through the
   node's services and written in the Mobile VLA HDF5 format.
2. Inspect: `mobile_vla dataset validate` and `dataset info` on what was recorded.
3. Serve: the recorded frames go through `mobile_vla infer` (Kosmos-2 → [ACT] → LSTM head,
   history carried across frames) and the predicted chunks are printed next to the
   recorded commands.

Until the on-device training issue lands, step 3 uses the tiny random-weight test model
shipped in test/fixtures/policy/native, so its actions show the serving path, not skill.
Outputs go to out/demo/.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import rclpy
from geometry_msgs.msg import Twist
from mobile_vla.srv import StartEpisode
from PIL import Image as PILImage
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("MOBILE_VLA_BIN_DIR", ROOT / "target/debug"))
OUT = ROOT / "out" / "demo"
DOMAIN = int(os.environ.get("MOBILE_VLA_DEMO_DOMAIN", "87"))
MODEL = ROOT / "test/fixtures/policy/native"
INSTRUCTION = "navigate around the box on the left side and reach the cup"
W, H = 160, 120
# (vx, vy, wz) per key press, as a keyboard teleop would send them; zeros release the key.
DRIVE = [(0.5, 0, 0), (0, 0, 0), (0, 0.5, 0), (0, 0, 0), (0.5, 0, 0.3), (0, 0, 0), (0.5, 0, 0), (0, 0, 0)]


def camera(yaw: float, x: float) -> np.ndarray:
    """A BGR frame: grey floor, white wall, a brown box that moves as the robot drives."""
    img = np.full((H, W, 3), (90, 90, 90), np.uint8)
    img[: H // 2] = (230, 230, 230)
    cx = int(W / 2 - yaw * 60)
    size = int(20 + 15 * x)
    img[H // 2 - size // 2 : H // 2 + size, max(cx - size, 0) : max(cx + size, 0)] = (40, 80, 140)
    return img


def image_msg(bgr: np.ndarray) -> Image:
    msg = Image(width=W, height=H, encoding="bgr8", step=W * 3)
    msg.data = bgr.tobytes()
    return msg


def run(cmd):
    print("$", " ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    print(res.stdout.rstrip() or res.stderr.rstrip())
    if res.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{res.stderr}")
    return res.stdout


def record(episodes: Path) -> Path:
    print(f"== 1. record: recorder_node -> {episodes}")
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    log = open(OUT / "recorder_node.log", "w")
    node = subprocess.Popen(
        [str(BIN / "recorder_node"), "--ros-args", "-p", f"output_dir:={episodes}",
         "-p", "scenario:=1box_hori_left"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    rclpy.init(domain_id=DOMAIN)
    robot = rclpy.create_node("demo_robot")
    cam = robot.create_publisher(Image, "image", 10)
    cmd = robot.create_publisher(Twist, "cmd_vel", 10)
    instr = robot.create_publisher(String, "instruction", 10)
    start = robot.create_client(StartEpisode, "/recorder_node/start_episode")
    stop = robot.create_client(Trigger, "/recorder_node/stop_episode")

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rclpy.spin_once(robot, timeout_sec=0.02)

    def call(client, req):
        fut = client.call_async(req)
        end = time.monotonic() + 10
        while not fut.done() and time.monotonic() < end:
            rclpy.spin_once(robot, timeout_sec=0.05)
        if not fut.done():
            raise SystemExit("recorder_node did not answer")
        return fut.result()

    try:
        if not start.wait_for_service(timeout_sec=30):
            raise SystemExit(f"recorder_node did not come up (log: {OUT / 'recorder_node.log'})")
        # Discovery: publish only once the node's subscriptions have matched ours.
        end = time.monotonic() + 20
        while min(p.get_subscription_count() for p in (cam, cmd, instr)) == 0 and time.monotonic() < end:
            spin(0.05)
        yaw = x = 0.0
        for _ in range(10):
            instr.publish(String(data=INSTRUCTION))
            cam.publish(image_msg(camera(yaw, x)))
            spin(0.1)
        resp = call(start, StartEpisode.Request())
        print(f"start_episode: {resp.message}")
        for vx, vy, wz in DRIVE:
            t = Twist()
            t.linear.x, t.linear.y, t.angular.z = float(vx), float(vy), float(wz)
            cmd.publish(t)
            # The robot moves for 0.4 s per key press (the fork's collector), the camera follows.
            x += 0.4 * vx
            yaw += 0.4 * wz
            for _ in range(4):
                cam.publish(image_msg(camera(yaw, x)))
                spin(0.1)
        resp = call(stop, Trigger.Request())
        print(f"stop_episode: {resp.message}")
        deadline = time.monotonic() + 15
        while not list(episodes.glob("*.h5")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        robot.destroy_node()
        rclpy.shutdown()
        node.send_signal(signal.SIGINT)
        node.wait(15)
        log.close()
    files = sorted(episodes.glob("*.h5"))
    if not files:
        raise SystemExit(f"no episode written (log: {OUT / 'recorder_node.log'})")
    return files[-1]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    episodes = OUT / "episodes"
    for old in episodes.glob("*.h5"):
        old.unlink()
    episode = record(episodes)

    print("\n== 2. inspect")
    run([BIN / "mobile_vla", "dataset", "validate", episodes])
    run([BIN / "mobile_vla", "dataset", "info", episode])

    print(f"\n== 3. serve: mobile_vla infer over the recorded frames (model: {MODEL.relative_to(ROOT)},")
    print("   tiny random weights until on-device training lands)")
    frames_dir = OUT / "frames"
    frames_dir.mkdir(exist_ok=True)
    with h5py.File(episode, "r") as f:
        order = f.attrs.get("image_channel_order", "bgr")
        images, actions = f["images"][:], f["actions"][:]
    paths = []
    for i, frame in enumerate(images):
        rgb = frame[:, :, ::-1] if order == "bgr" else frame
        path = frames_dir / f"f{i:02d}.png"
        PILImage.fromarray(np.ascontiguousarray(rgb)).save(path)
        paths.append(path)
    args = [BIN / "mobile_vla", "infer", "--model", MODEL, "--instruction", INSTRUCTION]
    for p in paths:
        args += ["--image", p]
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"infer failed:\n{res.stderr}")
    steps = json.loads(res.stdout)["steps"]
    print(f"{'step':>4}  {'recorded (vx, vy, wz)':>24}  predicted chunk[0] (vx, vy, wz)")
    for i, (rec, step) in enumerate(zip(actions, steps)):
        pred = step["actions"][0]
        print(f"{i:>4}  {rec[0]:+.2f} {rec[1]:+.2f} {rec[2]:+.2f}{'':>9}  "
              f"{pred[0]:+.3f} {pred[1]:+.3f} {pred[2]:+.3f}  (chunk of {len(step['actions'])}, dt {step['dt']:.2f} s)")
    print(f"\ndemo done: episode {episode.relative_to(ROOT)}, {len(steps)} policy steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
