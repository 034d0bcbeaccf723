"""MCAP files as `ros2 bag record -s mcap` writes them: profile `ros2`, CDR messages, `ros2msg` schemas with
their dependencies appended (`MSG: pkg/Type` sections), so Foxglove and `ros2 bag` open them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from mcap.writer import Writer
from rclpy.serialization import serialize_message

PRIMITIVES = {
    "bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
    "int64", "uint64", "string", "wstring",
}
SEPARATOR = "=" * 80


def _msg_text(full: str) -> str:
    pkg, _, name = full.split("/")
    return (Path(get_package_share_directory(pkg)) / "msg" / f"{name}.msg").read_text()


def _deps(text: str, pkg: str) -> list[str]:
    """Message types a .msg text uses, as `pkg/msg/Name`."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        typ = re.sub(r"\[.*\]$", "", line.split()[0])
        typ = re.sub(r"<=\d+$", "", typ)
        if typ in PRIMITIVES:  # constants are always primitive too
            continue
        if "/" not in typ:
            typ = "std_msgs/Header" if typ == "Header" else f"{pkg}/{typ}"
        p, _, n = typ.rpartition("/")
        out.append(f"{p.split('/')[0]}/msg/{n}")
    return out


def message_definition(full: str) -> str:
    """`sensor_msgs/msg/Image` -> its .msg text followed by every dependency's, depth-first, once each."""
    parts, seen, todo = [_msg_text(full)], {full}, _deps(_msg_text(full), full.split("/")[0])
    while todo:
        dep = todo.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        text = _msg_text(dep)
        pkg, _, name = dep.split("/")
        parts.append(f"{SEPARATOR}\nMSG: {pkg}/{name}\n{text}")
        todo.extend(_deps(text, pkg))
    return "\n".join(parts)


class McapLog:
    """Writes ROS messages to `path` (atomically: a temp file renamed on close)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._file = open(self._tmp, "wb")
        self._writer = Writer(self._file)
        self._writer.start(profile="ros2", library="mobile_vla sim")
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self.count = 0

    def write(self, topic: str, msg, t_ns: int) -> None:
        typ = type(msg)
        full = f"{typ.__module__.split('.')[0]}/msg/{typ.__name__}"
        if topic not in self._channels:
            if full not in self._schemas:
                self._schemas[full] = self._writer.register_schema(
                    name=full, encoding="ros2msg", data=message_definition(full).encode()
                )
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding="cdr", schema_id=self._schemas[full]
            )
        self._writer.add_message(self._channels[topic], log_time=t_ns, data=serialize_message(msg), publish_time=t_ns)
        self.count += 1

    def close(self) -> None:
        self._writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
