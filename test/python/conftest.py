"""Shared pytest fixtures: where the Rust binaries are, a ROS domain per test,
node processes started for real, and an rclpy node to talk to them."""

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_domains = itertools.count()

# DDS discovery never leaves loopback, whatever the caller's environment says.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def bin_path(name: str) -> Path:
    path = Path(os.environ.get("MOBILE_VLA_BIN_DIR", REPO / "target" / "debug")) / name
    if not path.exists():
        pytest.fail(f"{path} not found: build it first (make build) or set MOBILE_VLA_BIN_DIR")
    return path


@pytest.fixture
def ros_domain() -> int:
    """A ROS_DOMAIN_ID of this test's own (1..100), so parallel or leftover processes
    from other tests never cross-talk."""
    return 1 + (os.getpid() * 13 + next(_domains)) % 100


class NodeProcess:
    """A node started as a real process (a Rust binary, or `argv` such as the Python simulator),
    stopped with SIGINT."""

    def __init__(self, name: str, args=(), domain: int = 0, env=None, cwd=None, argv=None):
        self.log_path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"{name}-{os.getpid()}-{domain}.log"
        self._log = open(self.log_path, "w+b")
        full_env = dict(os.environ, ROS_DOMAIN_ID=str(domain), RUST_LOG="info", **(env or {}))
        self.proc = subprocess.Popen(
            [str(a) for a in argv] if argv else [str(bin_path(name)), *args],
            env=full_env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Restore default SIGINT handling even if pytest was started in the background.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGINT, timeout=10.0) -> int:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"node did not stop within {timeout}s:\n{self.output()}")
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_node(ros_domain):
    procs = []

    def start(name, *args, **kw):
        p = NodeProcess(name, args, domain=ros_domain, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.alive():
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def rclpy_node(ros_domain):
    """An rclpy node in the test's domain, with its own context."""
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain)
    node = rclpy.create_node(f"test_client_{os.getpid()}", context=ctx)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def spin_until(node, predicate, timeout=20.0, step=0.05):
    """Spins `node` until `predicate()` is true; returns whether it became true."""
    import rclpy

    executor = rclpy.executors.SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            executor.spin_once(timeout_sec=step)
        return predicate()
    finally:
        executor.remove_node(node)


def call_service(node, client, request, timeout=20.0, resend=3.0):
    """Calls a service; returns the response, or None after `timeout`. The request is sent again
    when no answer came within `resend` s: a server that has not yet discovered this client's
    reply reader drops the reply (rmw_fastrtps waits only 100 ms for it, "cannot answer a request:
    RCL_RET_TIMEOUT"), which discovery on a loaded machine can exceed. Only for requests that are
    safe to repeat."""
    deadline = time.monotonic() + timeout
    while True:
        fut = client.call_async(request)
        if spin_until(node, fut.done, timeout=max(0.0, min(resend, deadline - time.monotonic()))):
            return fut.result()
        client.remove_pending_request(fut)
        if time.monotonic() >= deadline:
            return None


class LifecycleClient:
    """`ros2 lifecycle` from rclpy: the lifecycle_msgs services and `~/transition_event` of the
    managed node `name` (e.g. "/recorder_node")."""

    # The events of configure, activate, deactivate, cleanup and shutdown, in that order.
    WHOLE_CYCLE = (("unconfigured", "configuring"), ("configuring", "inactive"), ("inactive", "activating"),
                   ("activating", "active"), ("active", "deactivating"), ("deactivating", "inactive"),
                   ("inactive", "cleaningup"), ("cleaningup", "unconfigured"), ("unconfigured", "shuttingdown"),
                   ("shuttingdown", "finalized"))

    def __init__(self, node, name: str, proc):
        from lifecycle_msgs.msg import Transition, TransitionEvent
        from lifecycle_msgs.srv import ChangeState, GetAvailableTransitions, GetState

        self.node, self.proc = node, proc
        self.events = []
        node.create_subscription(TransitionEvent, f"{name}/transition_event", self.events.append, 10)
        self.change_state = node.create_client(ChangeState, f"{name}/change_state")
        self.get_state = node.create_client(GetState, f"{name}/get_state")
        self.transitions = node.create_client(GetAvailableTransitions, f"{name}/get_available_transitions")
        assert spin_until(node, self.get_state.service_is_ready, timeout=60), f"{name} has no lifecycle:\n{proc.output()}"
        # Transitions are not safe to repeat: settle the reply path of change_state with a request
        # the node refuses (an unknown transition), repeated until it is answered.
        warm = ChangeState.Request(transition=Transition(label="warm_up"))
        assert call_service(node, self.change_state, warm, timeout=60) is not None, proc.output()

    def call(self, client, request, timeout=30.0):
        """A service call; requests other than transitions are resent until answered."""
        assert client.wait_for_service(timeout_sec=10), f"no service:\n{self.proc.output()}"
        resend = timeout if client is self.change_state else 3.0
        resp = call_service(self.node, client, request, timeout=timeout, resend=resend)
        assert resp is not None, f"no answer:\n{self.proc.output()}"
        return resp

    def transition(self, label: str, timeout=30.0) -> bool:
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition.label = label
        return self.call(self.change_state, req, timeout=timeout).success

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(self.get_state, GetState.Request()).current_state.label

    def saw(self, *steps) -> bool:
        """Spins until the transition events include `steps` [(start label, goal label)] in order."""
        def found():
            seen = iter([(e.start_state.label, e.goal_state.label) for e in self.events])
            return all(s in seen for s in steps)

        return spin_until(self.node, found, timeout=10)
