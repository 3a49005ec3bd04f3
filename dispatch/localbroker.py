"""A private RabbitMQ node for ``dispatch demo`` when no broker is configured or reachable.

:class:`PrivateBroker` runs Debian's ``rabbitmq-server`` as a throwaway node: its own data
directory, Erlang cookie, node name, free AMQP and distribution ports on loopback, no plugins,
and none of the system's ``/etc/rabbitmq`` files. It stops what it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from kombu.connection import Connection

from dispatch.errors import BrokerUnreachableError

__all__ = [
    "RABBITMQ_CTL",
    "RABBITMQ_SERVER",
    "PrivateBroker",
    "broker_reachable",
    "install_rabbitmq",
    "rabbitmq_installed",
]

log = logging.getLogger(__name__)

# The /usr/sbin wrappers switch to the rabbitmq user and hang; these run as the caller.
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQ_CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")

_POLL_INTERVAL_S = 0.25
_CTL_TIMEOUT_S = 30.0
_EXIT_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 15
_LOG_CHARS = 800


def broker_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Return True when an AMQP connection to ``url`` opens and closes; never raises."""
    try:
        with Connection(url, connect_timeout=timeout_s) as connection:
            # Not connect(): that retries once after sleeping 2 s.
            connection.ensure_connection(max_retries=0)
    except Exception:  # any failure means "not reachable"
        return False
    return True


def rabbitmq_installed() -> bool:
    """Return True when Debian's rabbitmq-server and rabbitmqctl are installed."""
    return all(os.access(path, os.X_OK) for path in (RABBITMQ_SERVER, RABBITMQ_CTL))


def install_rabbitmq() -> None:
    """Install Debian's ``rabbitmq-server`` package with apt-get.

    Raises :class:`BrokerUnreachableError` with a one-line reason when not root, when
    apt-get is missing, or when it fails.
    """
    if os.geteuid() != 0:
        raise BrokerUnreachableError(
            "rabbitmq-server is not installed and installing it needs root: "
            "run `apt-get install rabbitmq-server` as root or configure a broker URL"
        )
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise BrokerUnreachableError(
            "rabbitmq-server is not installed and apt-get is missing: "
            "install RabbitMQ yourself or configure a broker URL"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    steps = (
        ["update", "-qq", *lock],
        ["install", "-y", "-qq", "--no-install-recommends", *lock, "rabbitmq-server"],
    )
    for args in steps:
        log.info("running apt-get %s", args[0])
        done = subprocess.run(
            [apt_get, *args], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BrokerUnreachableError(
                f"apt-get {args[0]} failed with exit {done.returncode}: {_output_line(done, -1)}"
            )


def _output_line(done: subprocess.CompletedProcess[str], index: int) -> str:
    """One line of stderr, else stdout: apt says why last, rabbitmqctl first."""
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[index].strip() if lines else "no output"


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports free on loopback right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class PrivateBroker:
    """A throwaway RabbitMQ node: own data dir, free AMQP and distribution ports, no plugins."""

    def __init__(self, data_dir: Path | None = None, *, startup_timeout_s: float = 60.0) -> None:
        self._given_dir = data_dir
        self._startup_timeout_s = startup_timeout_s
        #: The node's data directory once started; None again after a created one is removed.
        self.data_dir: Path | None = None
        self._env: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self.nodename = f"dispatch-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.port = 0
        self.dist_port = 0

    @property
    def url(self) -> str:
        """The AMQP URL of the node; guest may log in because the node listens on loopback."""
        if not self.port:
            raise RuntimeError("PrivateBroker.url is known only after start()")
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> PrivateBroker:
        """Start the node and wait until it accepts AMQP connections; return self."""
        if self._proc is not None:
            return self
        if not rabbitmq_installed():
            raise BrokerUnreachableError(
                f"{RABBITMQ_SERVER} is missing: rabbitmq-server is not installed"
            )
        data_dir = self._prepare_data_dir()
        self.port, self.dist_port = _free_ports(2)
        self._env = self._node_env(data_dir)
        log.info("starting RabbitMQ node %s on port %d in %s", self.nodename, self.port, data_dir)
        started = time.monotonic()
        with (data_dir / "node.out").open("wb") as out:
            self._proc = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                env=self._env,
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        log.info("node %s up in %.1f s", self.nodename, time.monotonic() - started)
        return self

    def stop(self) -> None:
        """Stop the node if it runs and remove a data dir this broker created; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            started = time.monotonic()
            self._stop_node(proc)
            log.info("node %s stopped in %.1f s", self.nodename, time.monotonic() - started)
        if self.data_dir is not None and self._given_dir is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _prepare_data_dir(self) -> Path:
        """Create the data dir with empty configs, so nothing is read from /etc/rabbitmq."""
        if self._given_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="dispatch-rabbitmq-"))
        else:
            data_dir = self._given_dir
            data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        (data_dir / "log").mkdir(exist_ok=True)
        (data_dir / "enabled_plugins").write_text("[].\n")
        (data_dir / "rabbitmq-env.conf").write_text("")
        (data_dir / "rabbitmq.conf").write_text("")
        return data_dir

    def _node_env(self, data_dir: Path) -> dict[str, str]:
        """The child's environment: ours minus every RABBITMQ_* variable, plus the node's own."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        mnesia = data_dir / "mnesia"
        env.update(
            HOME=str(data_dir),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(mnesia),
            RABBITMQ_MNESIA_DIR=str(mnesia / self.nodename),
            RABBITMQ_LOG_BASE=str(data_dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(data_dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(data_dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(data_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(data_dir / "advanced.config"),
            RABBITMQ_PID_FILE=str(data_dir / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _wait_until_ready(self, started: float) -> None:
        assert self._proc is not None  # noqa: S101 - start() just set it
        deadline = started + self._startup_timeout_s
        while not broker_reachable(self.url):
            if self._proc.poll() is not None:
                self._fail(f"exited (status {self._proc.returncode}) before accepting connections")
            if time.monotonic() > deadline:
                self._fail(f"did not accept connections within {self._startup_timeout_s:g} s")
            time.sleep(_POLL_INTERVAL_S)

    def _fail(self, what: str) -> NoReturn:
        tail = self._log_tail()
        raise BrokerUnreachableError(
            f"private RabbitMQ node {self.nodename} {what}; from its log:\n{tail}"
        )

    def _log_tail(self) -> str:
        """The reason after BOOT FAILED on one line, else the last lines the node printed."""
        path = self.data_dir / "node.out" if self.data_dir else None
        text = path.read_text(errors="replace") if path and path.is_file() else ""
        _, failed, after = text.partition("BOOT FAILED")
        if failed:
            reason = after.lstrip("= \n").split("\n\n", 1)[0]
            return "BOOT FAILED: " + " ".join(reason.split())[:_LOG_CHARS]
        lines = [line[:_LOG_CHARS] for line in text.splitlines() if line.strip()]
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(the node printed nothing)"

    def _stop_node(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop with rabbitmqctl, then SIGTERM and SIGKILL the node's process group if need be."""
        grace_s = _EXIT_TIMEOUT_S if proc.poll() is not None or self._ctl_stop() else 0.0
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("private RabbitMQ node %s: sending %s", self.nodename, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            grace_s = _EXIT_TIMEOUT_S
        proc.wait()

    def _ctl_stop(self) -> bool:
        """Ask the node to stop with rabbitmqctl (same env, so same cookie); True if it agreed."""
        try:
            done = subprocess.run(
                [str(RABBITMQ_CTL), "stop"],
                env=self._env,
                capture_output=True,
                text=True,
                timeout=_CTL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("rabbitmqctl stop for %s failed: %s", self.nodename, exc)
            return False
        if done.returncode != 0:
            log.warning("rabbitmqctl stop for %s failed: %s", self.nodename, _output_line(done, 0))
        return done.returncode == 0
