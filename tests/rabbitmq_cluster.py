"""A private three-node RabbitMQ cluster on this machine, for the cluster tests.

Each node is Debian's ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (never the ``/usr/sbin``
wrapper, which switches to the rabbitmq user) under its own node name, AMQP and
distribution ports (free ones, asked of the OS), and data, log and pid paths in a
temporary directory. The nodes share an Erlang cookie through a ``HOME`` of their own
in that directory, so the machine's cookie is neither read nor written. Every wait is
bounded and a failure carries the tail of the node's log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_DIR = Path(__file__).resolve().parent / "rabbitmq"
START_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 60.0


def free_port() -> int:
    """Return a TCP port the OS has just handed out (and taken back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ClusterError(RuntimeError):
    """Raised when a cluster node does not start, join or stop in time."""


@dataclass
class Node:
    """One RabbitMQ node of the cluster."""

    name: str
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None
    running: bool = False

    @property
    def url(self) -> str:
        """Return the node's AMQP URL (guest, default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the node's logs, for error messages."""
        parts = []
        for path in [*sorted((self.base / "log").glob("*.log")), self.base / "stdout.log"]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


@dataclass
class Cluster:
    """Three (or ``size``) clustered nodes; ``start`` then ``stop``, even after a failure."""

    size: int = 3
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dispatch-cluster.")))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        home = self.root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        for i in range(1, self.size + 1):
            base = self.root / f"n{i}"
            (base / "log").mkdir(parents=True)
            self.nodes.append(Node(f"dtest{i}-{tag}@localhost", free_port(), free_port(), base))

    @property
    def urls(self) -> str:
        """Return every node's URL, ``;``-separated, as Dispatch takes a cluster."""
        return ";".join(n.url for n in self.nodes)

    def env(self, node: Node) -> dict[str, str]:
        """Return the environment a node (or rabbitmqctl talking to it) runs with."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(self.root / "home"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(RABBITMQ_DIR / "cluster.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(RABBITMQ_DIR / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(RABBITMQ_DIR / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(RABBITMQ_DIR / "plugins"),
        }

    # -- commands ---------------------------------------------------------------------

    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl",
            timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` (or another CLI tool); return its output."""
        cmd = [str(BIN / tool), "-n", node.name, *args]
        try:
            done = subprocess.run(cmd, env=self.env(node), capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{' '.join(cmd[2:])} on {node.name}: no answer in "
                               f"{timeout_s:.0f} s\n{node.log_tail()}") from None
        if done.returncode:
            raise ClusterError(f"{' '.join(cmd[2:])} on {node.name} failed "
                               f"({done.returncode}): {done.stderr.strip()}\n{node.log_tail()}")
        return done.stdout

    def start(self) -> None:
        """Start every node (all at once), then join the others to the first one."""
        self._at_once(self.start_node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        running = self.ctl(first, "eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(self.size):
            raise ClusterError(f"{running} of {self.size} nodes running after the joins\n"
                               f"{first.log_tail()}")

    def start_node(self, node: Node) -> None:
        """Start one node and wait (bounded) until it serves AMQP."""
        with (node.base / "stdout.log").open("ab") as out:
            node.proc = subprocess.Popen([str(BIN / "rabbitmq-server")], env=self.env(node),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        node.running = True
        try:
            self.ctl(node, "wait", "--timeout", str(int(START_TIMEOUT_S)),
                     str(node.base / "rabbitmq.pid"), timeout_s=START_TIMEOUT_S + 10)
        except ClusterError:
            if node.proc.poll() is not None:
                raise ClusterError(f"{node.name} exited with {node.proc.returncode}\n"
                                   f"{node.log_tail()}") from None
            raise

    def stop_node(self, node: Node, app_stopped: threading.Event | None = None) -> None:
        """Stop one node (its app, then the VM); kill it if it does not go.

        ``app_stopped`` is set once the node no longer serves AMQP (its app stopped).
        """
        if not node.running:
            return
        node.running = False
        with contextlib.suppress(ClusterError):
            self.ctl(node, "stop_app", timeout_s=30)
        if app_stopped is not None:
            app_stopped.set()
        with contextlib.suppress(ClusterError):
            self.ctl(node, "stop", timeout_s=30)
        self._reap(node)

    def _reap(self, node: Node) -> None:
        proc = node.proc
        if proc is None:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the node's own session, nothing else
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop every node still running (all at once) and remove the cluster's directory."""
        def stop_or_kill(node: Node) -> None:
            try:
                self.stop_node(node)
            except Exception:  # tear down the rest whatever happens
                if node.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.proc.pid, signal.SIGKILL)

        try:
            self._at_once(stop_or_kill)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _at_once(self, action: Callable[[Node], None]) -> None:
        """Run ``action`` on every node, each in a thread of its own; raise the first error.

        A node's start or stop is mostly waiting on its Erlang VM (and on one rabbitmqctl
        VM after another): three of them side by side take a third of the time.
        """
        errors: list[BaseException] = []

        def run(node: Node) -> None:
            try:
                action(node)
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(node,), name=f"cluster-{node.name}")
                   for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    # -- what the tests ask -----------------------------------------------------------

    def node_named(self, name: str) -> Node:
        """Return the node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def leader_of(self, queue: str, timeout_s: float = 30.0) -> Node:
        """Return the node that holds the leader of quorum queue ``queue``."""
        deadline = time.monotonic() + timeout_s
        asker = next(n for n in self.nodes if n.running)
        while True:
            out = self.ctl(asker, "list_queues", "-q", "--no-table-headers", "name", "leader")
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue and "@" in parts[1]:
                    return self.node_named(parts[1])
            if time.monotonic() > deadline:
                raise ClusterError(f"no leader for {queue} in {timeout_s:.0f} s: {out}")
            time.sleep(0.5)
