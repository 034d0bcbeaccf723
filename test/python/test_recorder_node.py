"""recorder_node as a real process: episodes recorded from rclpy-published topics are
checked with h5py the way the Mobile VLA loaders read them; kill -9 loses nothing saved."""

import io
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import LifecycleClient, bin_path, call_service, spin_until

W, H = 8, 6


def bgr_frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def image_msg(frame_bgr: np.ndarray):
    from sensor_msgs.msg import Image

    msg = Image(width=W, height=H, encoding="bgr8", step=W * 3)
    msg.data = frame_bgr.tobytes()
    return msg


def png_msg(frame_bgr: np.ndarray):
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    buf = io.BytesIO()
    PILImage.fromarray(frame_bgr[:, :, ::-1].copy()).save(buf, format="PNG")  # PIL wants RGB
    return CompressedImage(format="png", data=buf.getvalue())


class Client:
    """The rclpy side: publishers for the recorder's inputs and its services."""

    def __init__(self, node, cmd_type="twist", compressed=False):
        from geometry_msgs.msg import Twist, TwistStamped
        from mobile_vla.msg import RecordingStatus
        from mobile_vla.srv import StartEpisode
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        self.node = node
        self.stamped = cmd_type == "stamped"
        self.compressed = compressed
        self.img = node.create_publisher(CompressedImage if compressed else Image, "image", 10)
        self.cmd = node.create_publisher(TwistStamped if self.stamped else Twist, "cmd_vel", 10)
        self.instr = node.create_publisher(String, "instruction", 10)
        self.start = node.create_client(StartEpisode, "/recorder_node/start_episode")
        self.stop = node.create_client(Trigger, "/recorder_node/stop_episode")
        self.discard = node.create_client(Trigger, "/recorder_node/discard_episode")
        self.status = []
        node.create_subscription(RecordingStatus, "/recorder_node/status", self.status.append, 10)

    def wait_ready(self, proc):
        ok = spin_until(
            self.node,
            lambda: self.img.get_subscription_count() > 0
            and self.cmd.get_subscription_count() > 0
            and self.instr.get_subscription_count() > 0
            and self.start.service_is_ready(),
            timeout=60,
        )
        assert ok, f"recorder never came up:\n{proc.output()}"
        # start_episode is not safe to repeat: settle its reply path with a name the node refuses.
        from mobile_vla.srv import StartEpisode

        warm = StartEpisode.Request(episode_name="warm/up")
        resp = call_service(self.node, self.start, warm, timeout=60)
        assert resp is not None and not resp.success, proc.output()

    def send_image(self, frame):
        self.img.publish(png_msg(frame) if self.compressed else image_msg(frame))

    def send_cmd(self, vx, vy, wz):
        from geometry_msgs.msg import Twist, TwistStamped

        t = Twist()
        t.linear.x, t.linear.y, t.angular.z = vx, vy, wz
        if self.stamped:
            self.cmd.publish(TwistStamped(twist=t))
        else:
            self.cmd.publish(t)

    def call(self, client, request):
        # Not for start_episode: a resent start would be refused as "already recording".
        if client is self.start:
            fut = client.call_async(request)
            assert spin_until(self.node, fut.done, timeout=30)
            return fut.result()
        resp = call_service(self.node, client, request, timeout=30)
        assert resp is not None, f"{client.srv_name} did not answer"
        return resp

    def pause(self, seconds):
        spin_until(self.node, lambda: False, timeout=seconds)


def wait_for_file(directory: Path, pattern="*.h5", n=1, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(directory.glob(pattern))
        if len(files) >= n:
            return files
        time.sleep(0.1)
    return sorted(directory.glob(pattern))


def test_event_mode_episode_matches_the_mobile_vla_format(start_node, rclpy_node, tmp_path):
    from mobile_vla.srv import StartEpisode
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    out = tmp_path / "episodes"
    proc = start_node(
        "recorder_node", "--ros-args", "-p", f"output_dir:={out}", "-p", "scenario:=1box_hori_left"
    )
    c = Client(rclpy_node)
    c.wait_ready(proc)
    # Each step: a fresh image first (best effort, so send it a few times), then the command.
    steps = [(None, 0), ((0.5, 0.0, 0.0), 1), ((0.0, 0.0, 0.0), 2), ((0.0, 0.0, 1.0), 3), ((0.0, 0.0, 0.0), 4)]
    frames = [bgr_frame(seed) for _, seed in steps]
    # Our side may see the match before the node does, and a reliable volatile message sent
    # before that is lost: repeat the instruction for a while, as a real publisher would.
    for _ in range(10):
        c.instr.publish(String(data="go left around the box"))
        c.send_image(frames[0])
        c.pause(0.1)
    resp = c.call(c.start, StartEpisode.Request())
    assert resp.success, resp.message
    name = resp.episode_name
    assert name.startswith("episode_") and name.endswith("_1box_hori_left")
    for (cmd, _), frame in zip(steps[1:], frames[1:]):
        for _ in range(3):
            c.send_image(frame)
            c.pause(0.1)
        c.send_cmd(*cmd)
        if cmd[0] == 0.5:
            c.send_cmd(*cmd)  # a held key repeats the command: recorded once
        c.pause(0.3)
    resp = c.call(c.stop, Trigger.Request())
    assert resp.success, resp.message

    files = wait_for_file(out)
    assert [f.name for f in files] == [f"{name}.h5"], proc.output()
    with h5py.File(files[0], "r") as f:
        assert f.attrs["episode_name"] == name
        assert f.attrs["num_frames"] == 5
        assert f.attrs["action_chunk_size"] == 8
        assert f.attrs["image_channel_order"] == "bgr"
        assert 0 < f.attrs["total_duration"] < 30
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5, H, W, 3)
        assert f["images"].compression == "gzip"
        np.testing.assert_array_equal(f["images"][:], np.stack(frames))
        assert f["actions"].dtype == np.float32
        np.testing.assert_allclose(
            f["actions"][:], [[0, 0, 0], [0.5, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
        )
        events = [e.decode() if isinstance(e, bytes) else e for e in f["action_event_types"][:]]
        assert events == ["episode_start", "start_action", "stop_action", "start_action", "stop_action"]
        assert f["language_instruction"][0].decode() == "go left around the box"

    assert spin_until(rclpy_node, lambda: any(s.episodes_saved >= 1 for s in c.status))
    last = [s for s in c.status if s.episodes_saved >= 1][-1]
    assert last.last_saved_path == str(files[0]) and last.state == 0
    assert proc.stop() == 0, proc.output()


def test_a_step_before_its_frame_waits_for_the_next_one(start_node, rclpy_node, tmp_path):
    """A camera that lags the teleop (or has not sent a frame yet when the episode starts)
    loses no key press: each step takes the next frame that arrives within max_image_age_s."""
    from mobile_vla.srv import StartEpisode
    from std_srvs.srv import Trigger

    out = tmp_path / "episodes"
    proc = start_node("recorder_node", "--ros-args", "-p", f"output_dir:={out}",
                      "-p", "instruction:=wait for the camera", "-p", "max_image_age_s:=5.0")
    c = Client(rclpy_node)
    c.wait_ready(proc)
    assert c.call(c.start, StartEpisode.Request(episode_name="lagging_camera")).success
    c.send_cmd(0.5, 0.0, 0.0)  # no frame yet: episode_start and this press wait
    c.pause(0.5)
    frame = bgr_frame(3)
    for _ in range(3):  # best effort: a few times
        c.send_image(frame)
        c.pause(0.1)
    c.send_cmd(0.0, 0.0, 0.0)
    c.pause(0.3)
    assert c.call(c.stop, Trigger.Request()).success
    files = wait_for_file(out)
    assert [f.name for f in files] == ["lagging_camera.h5"], proc.output()
    with h5py.File(files[0], "r") as f:
        events = [e.decode() if isinstance(e, bytes) else e for e in f["action_event_types"][:]]
        assert events == ["episode_start", "start_action", "stop_action"], proc.output()
        np.testing.assert_allclose(f["actions"][:], [[0, 0, 0], [0.5, 0, 0], [0, 0, 0]])
        np.testing.assert_array_equal(f["images"][:], np.stack([frame] * 3))

    # Parameters are read at start: a live set is refused with the reason, not accepted and ignored.
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    client = rclpy_node.create_client(SetParameters, "/recorder_node/set_parameters")
    value = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=2.0)
    res = c.call(client, SetParameters.Request(parameters=[Parameter(name="max_image_age_s", value=value)]))
    assert not res.results[0].successful and "restart" in res.results[0].reason, res.results[0]
    assert proc.stop() == 0, proc.output()


def test_rate_mode_compressed_stamped_idle_timeout(start_node, rclpy_node, tmp_path):
    from mobile_vla.srv import StartEpisode

    out = tmp_path / "episodes"
    proc = start_node(
        "recorder_node", "--ros-args",
        "-p", f"output_dir:={out}", "-p", "mode:=rate", "-p", "rate_hz:=20.0",
        "-p", "compressed:=true", "-p", "cmd_stamped:=true", "-p", "idle_timeout_s:=1.0",
        "-p", "channel_order:=rgb", "-p", "instruction:=drive forward",
    )
    c = Client(rclpy_node, cmd_type="stamped", compressed=True)
    c.wait_ready(proc)
    frame = bgr_frame(7)
    for _ in range(3):
        c.send_image(frame)
        c.pause(0.05)
    assert c.call(c.start, StartEpisode.Request(episode_name="rate_ep")).success
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        c.send_image(frame)
        c.send_cmd(0.3, 0.0, -0.2)
        c.pause(0.05)
    # No more commands: the idle timeout (1 s) ends and saves the episode by itself.
    files = wait_for_file(out, timeout=10)
    assert [f.name for f in files] == ["rate_ep.h5"], proc.output()
    with h5py.File(files[0], "r") as f:
        n = f.attrs["num_frames"]
        assert n >= 10, n  # ~1.5 s at 20 Hz
        assert f.attrs["image_channel_order"] == "rgb"
        np.testing.assert_array_equal(f["images"][1], frame[:, :, ::-1])  # stored as RGB
        acts = f["actions"][:]
        moving = acts[np.abs(acts).sum(axis=1) > 0]
        np.testing.assert_allclose(moving, np.tile([0.3, 0.0, -0.2], (len(moving), 1)), rtol=1e-6)
        assert len(moving) >= n // 2
        assert f["language_instruction"][0].decode() == "drive forward"
    assert proc.stop(signal.SIGTERM) == 0, proc.output()


def test_kill_9_keeps_completed_episodes(start_node, rclpy_node, tmp_path, ros_domain):
    from mobile_vla.srv import StartEpisode
    from std_srvs.srv import Trigger

    out = tmp_path / "episodes"
    args = ("--ros-args", "-p", f"output_dir:={out}", "-p", "mode:=rate", "-p", "rate_hz:=20.0")
    proc = start_node("recorder_node", *args)
    c = Client(rclpy_node)
    c.wait_ready(proc)

    def stream(seconds, seed):
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            c.send_image(bgr_frame(seed))
            c.send_cmd(0.2, 0.1, 0.0)
            c.pause(0.05)

    stream(0.3, 1)
    assert c.call(c.start, StartEpisode.Request(episode_name="done_ep")).success
    stream(1.0, 1)
    assert c.call(c.stop, Trigger.Request()).success
    done = wait_for_file(out)
    assert [f.name for f in done] == ["done_ep.h5"]
    with h5py.File(done[0], "r") as f:
        saved_images = f["images"][:]
        saved_actions = f["actions"][:]

    assert c.call(c.start, StartEpisode.Request(episode_name="cut_ep")).success
    stream(1.0, 2)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)

    # The completed episode is intact; the interrupted one has no file under a final name.
    assert sorted(p.name for p in out.glob("*.h5")) == ["done_ep.h5"]
    with h5py.File(out / "done_ep.h5", "r") as f:
        np.testing.assert_array_equal(f["images"][:], saved_images)
        np.testing.assert_array_equal(f["actions"][:], saved_actions)
    assert (out / ".cut_ep.h5.partial").exists()

    # A restarted recorder salvages what the killed one had flushed. (The killed node's
    # DDS endpoints linger until their lease expires, so wait for the new node's log
    # line, which comes after recovery, not for graph matches.)
    proc2 = start_node("recorder_node", *args)
    deadline = time.monotonic() + 20
    while "-> " + str(out) not in proc2.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc2.alive(), proc2.output()
    names = sorted(p.name for p in out.glob("*.h5"))
    if "cut_ep.h5" in names:
        with h5py.File(out / "cut_ep.h5", "r") as f:
            n = f.attrs["num_frames"]
            assert n > 0 and f["images"].shape[0] == n == f["actions"].shape[0]
        assert "recovered" in proc2.output()
        assert not list(out.glob("*.partial")), proc2.output()
    elif (out / ".cut_ep.h5.partial").exists():
        # Killed mid-write beyond salvage: kept for a later look, never deleted.
        assert "stays there" in proc2.output(), proc2.output()
    else:
        assert "discarded" in proc2.output()
    validate = subprocess.run(
        [str(bin_path("mobile_vla")), "dataset", "validate", str(out)], capture_output=True, text=True
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert proc2.stop() == 0, proc2.output()


def test_start_episode_answers_the_real_outcome(start_node, rclpy_node, tmp_path):
    """Bad requests are refused up front with the reason; a failure to open the file is the
    answer, not a later surprise; SAVING shows while the writer finishes. Fails before the
    fix: every start answered success before the writer had tried to open the file."""
    from mobile_vla.msg import RecordingStatus
    from mobile_vla.srv import StartEpisode
    from std_srvs.srv import Trigger

    out = tmp_path / "episodes"
    proc = start_node("recorder_node", "--ros-args", "-p", f"output_dir:={out}")
    c = Client(rclpy_node)
    c.wait_ready(proc)
    (out / "taken.h5").write_bytes(b"")

    def start(**kw):
        return c.call(c.start, StartEpisode.Request(**kw))

    for request, reason in [
        (dict(episode_name="a/b"), "invalid episode name"),
        (dict(episode_name=".hidden"), "invalid episode name"),
        (dict(episode_name="taken"), "already exists"),
        (dict(episode_name="long", instruction="x" * 257), "257 bytes"),
    ]:
        resp = start(**request)
        assert not resp.success and reason in resp.message, (request, resp.message)
    assert not list(out.glob(".*.partial")), "a refused start must not leave files"

    # The writer cannot create the file (output_dir replaced by a file): the answer says so,
    # and so do ~/status and the log.
    out.rename(tmp_path / "moved")
    out.write_bytes(b"")
    resp = start(episode_name="nowhere")
    assert not resp.success and "nowhere" in resp.message, resp.message
    assert spin_until(rclpy_node, lambda: any("nowhere" in s.last_error for s in c.status))
    assert "cannot record nowhere" in proc.output()
    out.unlink()
    (tmp_path / "moved").rename(out)

    # A good start is answered once the file is open; the recorder is not stuck after failures.
    for _ in range(3):
        c.send_image(bgr_frame(1))
        c.pause(0.1)
    resp = start(episode_name="fine")
    assert resp.success and resp.episode_name == "fine", resp.message
    assert (out / ".fine.h5.partial").exists()
    assert not start(episode_name="second").success  # already recording
    c.send_cmd(0.5, 0.0, 0.0)
    c.pause(0.3)
    n_before = len(c.status)
    assert c.call(c.stop, Trigger.Request()).success
    assert spin_until(rclpy_node, lambda: any(s.episodes_saved == 1 and s.state == RecordingStatus.IDLE for s in c.status))
    states = [s.state for s in c.status[n_before:]]
    assert RecordingStatus.SAVING in states, states
    assert states.index(RecordingStatus.SAVING) < len(states) - 1 - states[::-1].index(RecordingStatus.IDLE)
    assert [f.name for f in wait_for_file(out, "fine.h5")] == ["fine.h5"]
    assert proc.stop() == 0, proc.output()


def test_lifecycle_deactivate_saves_the_episode(start_node, rclpy_node, tmp_path):
    """A managed recorder (autostart:=false) as lifecycle_manager drives it: unconfigured and
    inactive refuse episodes naming the state; configure prepares output_dir, activate records;
    deactivate, and shutdown from active, save the episode in progress before they return."""
    from mobile_vla.srv import StartEpisode

    out = tmp_path / "episodes"
    proc = start_node("recorder_node", "--ros-args", "-p", f"output_dir:={out}", "-p", "autostart:=false",
                      "-p", "instruction:=managed recording")
    c = Client(rclpy_node)
    c.wait_ready(proc)
    lc = LifecycleClient(rclpy_node, "/recorder_node", proc)
    assert lc.state() == "unconfigured"
    resp = c.call(c.start, StartEpisode.Request(episode_name="early"))
    assert not resp.success and "unconfigured" in resp.message, resp.message
    # A configure that fails (output_dir is a file) returns to unconfigured and logs why.
    out.write_bytes(b"")
    assert not lc.transition("configure") and lc.state() == "unconfigured"
    assert "cannot create output_dir" in proc.output(), proc.output()
    out.unlink()

    assert lc.transition("configure") and lc.state() == "inactive"
    assert out.is_dir()
    resp = c.call(c.start, StartEpisode.Request(episode_name="early"))
    assert not resp.success and "inactive" in resp.message, resp.message

    assert lc.transition("activate") and lc.state() == "active"
    frame = bgr_frame(5)
    for _ in range(3):
        c.send_image(frame)
        c.pause(0.1)
    resp = c.call(c.start, StartEpisode.Request(episode_name="managed_ep"))
    assert resp.success, resp.message
    c.send_cmd(0.5, 0.0, 0.0)
    c.pause(0.3)
    c.send_cmd(0.0, 0.0, 0.0)
    c.pause(0.3)

    # Deactivate ends the episode as stop_episode does: saved, on disk when the transition returns.
    assert lc.transition("deactivate") and lc.state() == "inactive"
    assert sorted(f.name for f in out.glob("*.h5")) == ["managed_ep.h5"], proc.output()
    validate = subprocess.run([str(bin_path("mobile_vla")), "dataset", "validate", str(out)],
                              capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    with h5py.File(out / "managed_ep.h5", "r") as f:
        events = [e.decode() if isinstance(e, bytes) else e for e in f["action_event_types"][:]]
        assert events == ["episode_start", "start_action", "stop_action"], events
        assert f["language_instruction"][0].decode() == "managed recording"
    resp = c.call(c.start, StartEpisode.Request(episode_name="late"))
    assert not resp.success and "inactive" in resp.message, resp.message

    assert lc.transition("cleanup") and lc.state() == "unconfigured"

    # Shutdown from active saves the episode in progress first.
    assert lc.transition("configure") and lc.transition("activate")
    for _ in range(3):
        c.send_image(frame)
        c.pause(0.1)
    assert c.call(c.start, StartEpisode.Request(episode_name="last_ep")).success
    c.send_cmd(0.0, 0.5, 0.0)
    c.pause(0.3)
    assert lc.transition("shutdown") and lc.state() == "finalized"
    assert sorted(f.name for f in out.glob("*.h5")) == ["last_ep.h5", "managed_ep.h5"], proc.output()
    with h5py.File(out / "last_ep.h5", "r") as f:
        assert f.attrs["num_frames"] == 2
    assert lc.saw(*lc.WHOLE_CYCLE[:8], ("active", "shuttingdown"), ("shuttingdown", "finalized")), \
        [(e.start_state.label, e.goal_state.label) for e in lc.events]
    assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize("bad", ["mode:=sometimes", "gzip_level:=12"])
def test_bad_parameters_fail_with_their_name(start_node, bad, tmp_path):
    proc = start_node("recorder_node", "--ros-args", "-p", f"output_dir:={tmp_path}", "-p", bad)
    proc.proc.wait(timeout=20)
    assert proc.proc.returncode != 0
    assert bad.split(":=")[0] in proc.output()
