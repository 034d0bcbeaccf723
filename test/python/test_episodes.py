"""Compatibility of mobile_vla episodes with the Mobile VLA fork's h5py tooling, and rosbag2 import.

(a) h5py reads Rust-written episodes exactly as the fork's loaders expect;
(b) Rust reads h5py-written (fork-style) episodes with identical content, and validates defects;
(c) bags written by the real `rosbags` rosbag2 writer (mcap + sqlite3) import to valid episodes.
"""

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MOBILE_VLA_BIN_DIR", REPO / "target" / "debug")) / "mobile_vla"
INSTRUCTION = "Navigate around the obstacle on the left side and reach the cup"
W, H = 32, 24
MS = 1_000_000


def run(*args, check=True):
    proc = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def info(path, content=True):
    args = ["dataset", "info", path, "--json"] + (["--content"] if content else [])
    return json.loads(run(*args).stdout)


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# ---------------------------------------------------------------- bag fixtures


def camera_rgb(k: int) -> np.ndarray:
    """Camera frame k (true RGB): red encodes k, green x, blue y."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([np.full((H, W), (k * 10) % 256), (x * 3) % 256, (y * 5) % 256], axis=-1).astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    """Minimal lossless PNG encoder (no PIL in the test interpreter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# Key presses (time ms, command) as the fork's collector publishes them: the command repeated at
# 20 Hz for 0.3 s, then one zero Twist. Two bursts separated by 2.5 s of idling.
PRESSES = [
    (500, (0.5, 0.0, 0.0)),
    (1000, (0.0, 0.5, 0.0)),
    (1500, (0.0, 0.0, 0.5)),
    (4500, (0.5, -0.5, 0.0)),
    (5000, (-0.5, 0.0, 0.0)),
]
IMAGE_PERIOD_MS, IMAGE_OFFSET_MS, BAG_MS = 100, 10, 6000
T0 = 1_764_764_710_000_000_000  # 2025-12-03 12:25:10 UTC


def commands():
    out = []
    for t, cmd in PRESSES:
        for k in range(6):
            out.append((t + 50 * k, cmd))
        out.append((t + 300, (0.0, 0.0, 0.0)))
    return out


def latest_image_index(t_ms: int) -> int:
    return (t_ms - IMAGE_OFFSET_MS) // IMAGE_PERIOD_MS


def write_bag(path: Path, plugin, bad_encoding=False):
    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image = ts.types["sensor_msgs/msg/Image"]
    CompressedImage = ts.types["sensor_msgs/msg/CompressedImage"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    Twist = ts.types["geometry_msgs/msg/Twist"]
    TwistStamped = ts.types["geometry_msgs/msg/TwistStamped"]
    Vector3 = ts.types["geometry_msgs/msg/Vector3"]
    String = ts.types["std_msgs/msg/String"]

    def header(t_ns):
        return Header(stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id="camera")

    msgs = []  # (t_ns, topic, msg)
    msgs.append((T0, "/instruction", String(data=INSTRUCTION)))
    for k in range(BAG_MS // IMAGE_PERIOD_MS):
        t = T0 + (k * IMAGE_PERIOD_MS + IMAGE_OFFSET_MS) * MS
        rgb = camera_rgb(k)
        enc = "weird8" if bad_encoding and k == 4 else "rgb8"
        msgs.append((t, "/camera/image_raw", Image(header=header(t), height=H, width=W, encoding=enc,
                                                   is_bigendian=0, step=W * 3, data=rgb.reshape(-1))))
        msgs.append((t, "/camera/image_raw/compressed", CompressedImage(
            header=header(t), format="png", data=np.frombuffer(png(rgb), dtype=np.uint8))))
    for t_ms, (vx, vy, wz) in commands():
        t = T0 + t_ms * MS
        tw = Twist(linear=Vector3(x=vx, y=vy, z=0.0), angular=Vector3(x=0.0, y=0.0, z=wz))
        msgs.append((t, "/cmd_vel", tw))
        msgs.append((t, "/cmd_vel_stamped", TwistStamped(header=header(t), twist=tw)))
    msgs.sort(key=lambda m: m[0])

    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for t, topic, msg in msgs:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msg.__msgtype__, typestore=ts)
            writer.write(conns[topic], t, ts.serialize_cdr(msg, msg.__msgtype__))


def expected_episodes():
    """Event mode, split on 2 s idle: episode_start (zero action) + one start_action per press."""
    eps = [PRESSES[:3], PRESSES[3:]]
    out = []
    for presses in eps:
        t0 = presses[0][0]
        frames = [(latest_image_index(t0), (0.0, 0.0, 0.0), "episode_start")]
        frames += [(latest_image_index(t), cmd, "start_action") for t, cmd in presses]
        out.append(frames)
    return out


@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def bag(request, tmp_path_factory):
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[request.param]
    path = tmp_path_factory.mktemp(request.param) / "bag"
    write_bag(path, plugin)
    meta = (path / "metadata.yaml").read_text()
    assert f"storage_identifier: {request.param}" in meta
    return path


def import_bag(bag, out, *extra, check=True):
    return run("dataset", "import-bag", bag, "--out", out, "--split-on-idle", "2s",
               "--image-topic", "/camera/image_raw", "--cmd-topic", "/cmd_vel", *extra, check=check)


# ---------------------------------------------------------------- (c) bag import


def test_bag_import_gives_expected_episodes(bag, tmp_path):
    proc = import_bag(bag, tmp_path)
    assert "2 episode(s) written" in proc.stdout
    files = sorted(tmp_path.glob("*.h5"))
    assert [f.name for f in files] == ["episode_20251203_122510.h5", "episode_20251203_122514.h5"]
    assert run("dataset", "validate", tmp_path).returncode == 0
    for f, frames in zip(files, expected_episodes()):
        with h5py.File(f, "r") as h:
            assert h["images"].shape == (len(frames), H, W, 3)
            events = [e.decode() for e in h["action_event_types"][:]]
            assert events == [e for _, _, e in frames]
            np.testing.assert_array_equal(h["actions"][:], np.array([a for _, a, _ in frames], dtype=np.float32))
            for i, (k, _, _) in enumerate(frames):
                # Stored BGR: the camera's RGB reversed.
                np.testing.assert_array_equal(h["images"][i], camera_rgb(k)[..., ::-1])
            assert h["language_instruction"][0].decode() == INSTRUCTION
            assert h.attrs["image_channel_order"] == "bgr"


def test_compressed_and_stamped_topics_import_identically(bag, tmp_path):
    import_bag(bag, tmp_path / "raw")
    run("dataset", "import-bag", bag, "--out", tmp_path / "png", "--split-on-idle", "2s",
        "--image-topic", "/camera/image_raw/compressed", "--cmd-topic", "/cmd_vel_stamped")
    a, b = info(tmp_path / "raw"), info(tmp_path / "png")
    for ea, eb in zip(a["episodes"], b["episodes"], strict=True):
        for key in ("num_frames", "actions", "events", "images_fnv1a64", "instruction"):
            assert ea[key] == eb[key], key


def test_bag_import_rate_mode_and_no_split(bag, tmp_path):
    run("dataset", "import-bag", bag, "--out", tmp_path, "--mode", "rate", "--rate-hz", "5",
        "--image-topic", "/camera/image_raw", "--cmd-topic", "/cmd_vel", "--channel-order", "rgb")
    (f,) = tmp_path.glob("*.h5")
    with h5py.File(f, "r") as h:
        # From the first press (0.5 s) to the last message (5.91 s) at 5 Hz: ticks 0.5, 0.7, … 5.9.
        assert h["images"].shape[0] == 28
        assert h.attrs["image_channel_order"] == "rgb"
        np.testing.assert_array_equal(h["images"][0], camera_rgb(latest_image_index(500)))
        ev = [e.decode() for e in h["action_event_types"][:]]
        assert ev[0] == "episode_start" and set(ev[1:]) == {"start_action", "stop_action"}


def test_unknown_encoding_names_topic_and_message(tmp_path):
    path = tmp_path / "bag"
    write_bag(path, StoragePlugin.MCAP, bad_encoding=True)
    proc = import_bag(path, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "/camera/image_raw" in proc.stderr and "message 4" in proc.stderr and "weird8" in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").glob("*.h5"))


def test_corrupt_bag_is_an_error(tmp_path):
    path = tmp_path / "bag"
    write_bag(path, StoragePlugin.MCAP)
    (mcap,) = path.glob("*.mcap")
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2])
    proc = import_bag(path, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "MCAP" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- (a) h5py reads Rust-written episodes


def test_h5py_reads_rust_episode_as_the_fork_expects(bag, tmp_path):
    import_bag(bag, tmp_path)
    f = sorted(tmp_path.glob("*.h5"))[0]
    with h5py.File(f, "r") as h:
        assert set(h.keys()) == {"images", "actions", "action_event_types", "language_instruction"}
        # attrs: the fork's four, plus our channel order.
        assert isinstance(h.attrs["episode_name"], str) and h.attrs["episode_name"] == f.stem
        assert isinstance(h.attrs["total_duration"], np.floating)
        assert h.attrs["total_duration"] == pytest.approx(1.0)  # first press 0.5 s → last press 1.5 s
        assert isinstance(h.attrs["num_frames"], np.integer) and h.attrs["num_frames"] == 4
        assert isinstance(h.attrs["action_chunk_size"], np.integer) and h.attrs["action_chunk_size"] == 8
        assert h.attrs["image_channel_order"] == "bgr"
        imgs, acts, ev = h["images"], h["actions"], h["action_event_types"]
        assert imgs.dtype == np.uint8 and imgs.shape == (4, H, W, 3) and imgs.compression == "gzip"
        assert acts.dtype == np.float32 and acts.shape == (4, 3) and acts.compression == "gzip"
        sd = h5py.check_string_dtype(ev.dtype)
        assert sd is not None and sd.encoding == "utf-8" and sd.length is None  # variable-length UTF-8
        assert ev.shape == (4,) and ev.compression == "gzip"
        li = h["language_instruction"]
        assert li.shape == (1,) and li.dtype == np.dtype("S256")
        assert li[0].decode("utf-8") == INSTRUCTION
        # The fork's loaders: np.array(images), actions[:, :3], decoded event labels.
        assert np.array(imgs).shape[1:] == (H, W, 3)
        assert [e.decode("utf-8") for e in ev[:]] == ["episode_start"] + ["start_action"] * 3


# ---------------------------------------------------------------- (b) Rust reads h5py-written episodes


def write_fork_episode(path: Path, t=6, instruction=None, newer_attrs=True):
    """Exactly as the fork's collector saves an episode (plus optional language_instruction)."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(t, H, W, 3), dtype=np.uint8)
    actions = rng.uniform(-1.15, 1.15, size=(t, 3)).astype(np.float32)
    labels = ["episode_start"] + ["start_action"] * (t - 2) + ["stop_action"]
    event_types = np.array(labels, dtype=h5py.string_dtype(encoding="utf-8"))
    with h5py.File(path, "w") as f:
        f.attrs["episode_name"] = path.stem
        f.attrs["total_duration"] = 7.25
        f.attrs["num_frames"] = images.shape[0]
        f.attrs["action_chunk_size"] = 8
        if newer_attrs:
            f.attrs["obstacle_layout_type"] = "hori"
            f.attrs["time_period"] = "day"
            f.attrs["collection_datetime"] = "2025-12-03T12:25:10.123456"
            f.attrs["collection_hour"] = 12
            f.attrs["collection_minute"] = 25
        f.create_dataset("images", data=images, compression="gzip")
        f.create_dataset("actions", data=actions, compression="gzip")
        f.create_dataset("action_event_types", data=event_types, compression="gzip")
        if instruction is not None:
            f.create_dataset("language_instruction", data=np.array([instruction.encode()], dtype="S256"))
    return images, actions, labels


def test_rust_reads_h5py_episode_identically(tmp_path):
    path = tmp_path / "episode_20251203_122510_1box_hori_right_core_medium.h5"
    images, actions, labels = write_fork_episode(path)
    out = info(path)
    (e,) = out["episodes"]
    assert e["episode_name"] == path.stem
    assert e["num_frames"] == 6 and e["total_duration"] == 7.25 and e["action_chunk_size"] == 8
    assert (e["frame_height"], e["frame_width"]) == (H, W)
    assert e["channel_order"] == "bgr" and e["channel_order_recorded"] is False
    assert e["instruction"] == "Navigate around the obstacle on the right side and reach the cup"
    assert e["instruction_derived"] is True
    assert e["events"] == labels
    np.testing.assert_array_equal(np.array(e["actions"], dtype=np.float32), actions)
    assert e["images_fnv1a64"] == fnv1a(images.tobytes())
    np.testing.assert_array_equal(np.array(e["action_min"], dtype=np.float32), actions.min(axis=0))
    np.testing.assert_array_equal(np.array(e["action_max"], dtype=np.float32), actions.max(axis=0))
    assert (e["obstacle_layout_type"], e["time_period"]) == ("hori", "day")
    assert e["collection_datetime"] == "2025-12-03T12:25:10.123456"
    assert (e["collection_hour"], e["collection_minute"]) == (12, 25)
    assert run("dataset", "validate", tmp_path).returncode == 0


def test_stored_instruction_wins_and_text_info(tmp_path):
    path = tmp_path / "episode_2box_vert_left.h5"
    write_fork_episode(path, instruction="go to the red cup", newer_attrs=False)
    (e,) = info(path, content=False)["episodes"]
    assert e["instruction"] == "go to the red cup" and e["instruction_derived"] is False
    text = run("dataset", "info", path).stdout
    assert "frames 6" in text and "go to the red cup" in text and "bgr (attribute absent: default)" in text


def test_validate_reports_every_defect_per_file(tmp_path):
    write_fork_episode(tmp_path / "good.h5")
    _, actions, _ = write_fork_episode(tmp_path / "nan.h5")
    with h5py.File(tmp_path / "nan.h5", "a") as f:
        a = f["actions"][:]
        a[2, 1] = np.nan
        f["actions"][...] = a
        f.attrs["num_frames"] = 9
    write_fork_episode(tmp_path / "noimg.h5")
    with h5py.File(tmp_path / "noimg.h5", "a") as f:
        del f["images"]
        del f.attrs["episode_name"]
    (tmp_path / "trunc.h5").write_bytes((tmp_path / "good.h5").read_bytes()[:3000])
    proc = run("dataset", "validate", tmp_path, check=False)
    assert proc.returncode != 0
    out = proc.stdout
    assert "ok      " + str(tmp_path / "good.h5") in out
    nan_block = out.split(str(tmp_path / "nan.h5"))[1].split("INVALID")[0]
    assert "actions: NaN/Inf at steps 2" in nan_block and "num_frames: 9, but images has 6 frames" in nan_block
    noimg_block = out.split(str(tmp_path / "noimg.h5"))[1].split("INVALID")[0]
    assert "images: missing dataset" in noimg_block and "episode_name: missing attribute" in noimg_block
    assert "file: not a readable HDF5 file" in out.split(str(tmp_path / "trunc.h5"))[1]
    assert "4 file(s): 1 valid, 3 invalid" in out


def test_validate_survives_files_that_crash_libhdf5(tmp_path):
    """A bit-flipped file (found by fuzzing) on which libhdf5 1.10 segfaults: validate isolates it."""
    crash = REPO / "test" / "fixtures" / "episodes" / "corrupt_metadata_crashes_libhdf5.h5"
    (tmp_path / "a_crash.h5").write_bytes(crash.read_bytes())
    write_fork_episode(tmp_path / "b_good.h5")
    proc = run("dataset", "validate", tmp_path, check=False)
    assert proc.returncode == 1
    # Debian's libhdf5 1.10.8 segfaults on it; another build may report an error instead.
    assert "INVALID " + str(tmp_path / "a_crash.h5") in proc.stdout
    crash_report = proc.stdout.split("a_crash.h5")[1].split("b_good.h5")[0]
    assert "file: " in crash_report
    assert "ok      " + str(tmp_path / "b_good.h5") in proc.stdout
    assert "2 file(s): 1 valid, 1 invalid" in proc.stdout
