"""Shared fixtures: one private RabbitMQ per test run, real workers as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kombu
import pytest

from dispatch import topology
from dispatch.client import Client

from amqp_helpers import stop_processes, wait_for_consumer

pytest_plugins = ["fixtures_postgres", "fixtures_ledger", "cloud_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_DIR = ROOT / "tests" / "rabbitmq"

# The test broker reads our files, never the machine's /etc/rabbitmq (set before it starts).
os.environ["RABBITMQ_CONFIG_FILE"] = str(RABBITMQ_DIR / "rabbitmq.conf")
os.environ["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(RABBITMQ_DIR / "advanced.config")
os.environ["RABBITMQ_CONF_ENV_FILE"] = str(RABBITMQ_DIR / "rabbitmq-env.conf")


@pytest.fixture(scope="session")
def broker_url(rabbitmq_proc: object) -> str:
    """The AMQP URL of the private test broker (started once per run by pytest-rabbitmq)."""
    host = rabbitmq_proc.host  # type: ignore[attr-defined]
    port = rabbitmq_proc.port  # type: ignore[attr-defined]
    return f"amqp://guest:guest@{host}:{port}//"


@pytest.fixture
def amqp(broker_url: str) -> Iterator[kombu.Connection]:
    """A plain kombu connection for tests that publish or inspect raw messages."""
    with kombu.Connection(broker_url, heartbeat=0) as conn:
        conn.connect()
        yield conn


@pytest.fixture
def pool() -> str:
    """A pool name no other test uses, so each test has its own job queue."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def workdir_root() -> Iterator[Path]:
    """A job directory root the unprivileged job account can traverse."""
    path = Path(tempfile.mkdtemp(prefix="dispatch-tests.", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


class Workers:
    """Starts ``dispatch worker`` subprocesses and stops them at the end of a test."""

    def __init__(self, broker_url: str, workdir_root: Path, log_dir: Path) -> None:
        self.broker_url = broker_url
        self.workdir_root = workdir_root
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, pools: tuple[str, ...] = (), wait_for: str | None = None,
              slots: int = 2) -> subprocess.Popen[bytes]:
        """Start a worker with ``args``; return once it consumes its first queue."""
        cmd = [sys.executable, "-m", "dispatch", "worker", "--broker", self.broker_url,
               "--workdir-root", str(self.workdir_root), "--slots", str(slots), "--kill-grace",
               "1", *(a for p in pools for a in ("--pool", p)), *args]
        if "--name" not in args:  # node names are unique, as in a real cluster
            cmd += ["--name", f"node{len(self.procs)}-{uuid.uuid4().hex[:6]}"]
        with (self.log_dir / f"worker-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        queue = wait_for or topology.pool_queue(pools[0])
        self.wait_consumed(queue, proc)
        return proc

    def wait_consumed(self, queue: str, proc: subprocess.Popen[bytes],
                      timeout_s: float = 20.0) -> None:
        """Wait until ``queue`` has a consumer (the worker bound and consumes it)."""
        def gone() -> str | None:
            if proc.poll() is None:
                return None
            return f"worker exited with {proc.returncode}: {self.log()}"

        try:
            wait_for_consumer(self.broker_url, queue, timeout_s=timeout_s, gone=gone)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.log()}") from None

    def log(self, index: int = -1) -> str:
        """Return what a worker wrote so far."""
        logs = sorted(self.log_dir.glob("worker-*.log"))
        return logs[index].read_text(errors="replace")[-4000:] if logs else ""

    def stop_all(self) -> None:
        """SIGTERM every worker, then SIGKILL those that do not stop, and their jobs.

        A worker SIGKILLed while a job runs (a test that failed mid-job) leaves that job
        running: any process still working in one of these workers' job directories
        (named ``<job>.<worker pid in hex>-<n>`` under the root) is killed too.
        """
        stop_processes(self.procs)
        tags = {f".{proc.pid:x}-" for proc in self.procs}
        root = f"{self.workdir_root}/"
        for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue  # gone, or not ours to read
            if cwd.startswith(root) and any(tag in cwd[len(root):] for tag in tags):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workers(broker_url: str, workdir_root: Path, tmp_path: Path) -> Iterator[Workers]:
    """Start real ``dispatch worker`` processes; they are stopped after the test."""
    w = Workers(broker_url, workdir_root, tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def worker(workers: Workers, pool: str) -> subprocess.Popen[bytes]:
    """One worker with two slots serving this test's pool."""
    return workers.start(pools=(pool,))


@pytest.fixture
def client(broker_url: str) -> Iterator[Client]:
    """A client with a fresh id and its own reply queue."""
    with Client(broker_url) as c:
        yield c


@pytest.fixture
def dispatch_cli(broker_url: str,
                 tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``dispatch`` command against the test broker."""
    env = {**os.environ, "DISPATCH_BROKER_URL": broker_url,
           "DISPATCH_CONFIG_DIR": str(tmp_path / "config")}

    def run(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dispatch", *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              check=False, **kwargs)  # type: ignore[call-overload]

    return run
