"""Fixtures of the cloud tests: the OpenStack double, the cloud plane's environment,
real ``celery worker``/``celery beat``/Flower processes, and a ledger fed real events."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack_double import OpenStackDouble
from sshd import Sshd

from dispatch import events
from dispatch.events import Event
from dispatch.ledger.store import Ledger
from workers.cloud import metadata

from amqp_helpers import stop_processes

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "debian-12"


@pytest.fixture
def cloud_double() -> Iterator[OpenStackDouble]:
    """The OpenStack double with the CANFAR seed's flavors and one image."""
    d = OpenStackDouble().start()
    for row in [("1", "m1.tiny", 1, 512, 5, 0), ("2", "m1.small", 2, 2048, 20, 0),
                ("3", "m1.medium", 2, 4096, 40, 0), ("4", "m1.large", 4, 8192, 80, 0),
                ("5", "m1.xlarge", 8, 16384, 160, 0),
                ("5d234569", "jt.large", 4, 16384, 10, 10)]:
        d.add_flavor(*row)
    d.add_flavor("db9e8d81", "me1.small", 2, 2048, 20, 20, is_public=False)
    d.add_image(IMAGE, size_bytes=2 * 1024**3)
    yield d
    d.stop()


@pytest.fixture
def cloud_env(cloud_double: OpenStackDouble, broker_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment of a cloud-plane process pointed at the double and the test broker."""
    clouds = cloud_double.write_clouds_yaml(tmp_path / "clouds.yaml")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DISPATCH_", "OS_", "CELERY"))}
    env.update({
        "DISPATCH_BROKER_URL": broker_url,
        "DISPATCH_CLOUDS_YAML": str(clouds),
        "DISPATCH_CLOUD": "double",
        "DISPATCH_CLOUD_IMAGE": IMAGE,
        "DISPATCH_CLOUD_STATE_DIR": str(tmp_path / "state"),
        "DISPATCH_CLOUD_BROKER_HEARTBEAT": "0",
        "DISPATCH_CLOUD_TASK_QUEUE": f"dispatch.cloud.t-{uuid.uuid4().hex[:8]}",
        "DISPATCH_CLOUD_GANG_QUEUE": f"dispatch.cloud.gangs-{uuid.uuid4().hex[:8]}",
        "DISPATCH_CLOUD_OWNER": "alice",
        "DISPATCH_CONFIG_DIR": str(tmp_path / "config"),
    })
    return env


def old(seconds: float) -> datetime.datetime:
    """Return the moment ``seconds`` ago."""
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)


def ours(pool: str, *, created: datetime.datetime, lifetime_s: int,
         **extra: str) -> dict[str, str]:
    """Return the metadata Dispatch writes on a server created at ``created``."""
    return {**metadata.initial(pool=pool, owner="alice", lifetime_s=lifetime_s, now=created),
            **extra}


class Processes:
    """Starts the cloud plane's processes (celery worker, beat, Flower) and stops them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``python -m ARGS`` logging to ``<name>.log``."""
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", *args], env=env or self.env,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir)
        self.procs.append((name, proc))
        return proc

    def celery_worker(self, name: str = "celery-worker", concurrency: int = 2
                      ) -> subprocess.Popen[bytes]:
        """Start a real ``celery worker -E`` serving the cloud tasks."""
        return self.start(name, "celery", "-A", "workers.cloud.app", "worker", "-E",
                          "--pool", "threads", "--concurrency", str(concurrency),
                          "--without-gossip", "--without-mingle", "--loglevel", "INFO",
                          "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h")

    def celery_beat(self, name: str = "celery-beat") -> subprocess.Popen[bytes]:
        """Start a real ``celery beat`` with its own schedule file."""
        return self.start(name, "celery", "-A", "workers.cloud.app", "beat", "--loglevel",
                          "INFO", "--schedule", str(self.log_dir / f"{name}-schedule"))

    def log(self, name: str) -> str:
        """Return what process ``name`` wrote so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """Return every process's output, for failure messages and secret checks."""
        return "\n".join(f"--- {name}\n{self.log(name)[-3000:]}" for name, _ in self.procs)

    def stop_all(self) -> None:
        """SIGTERM every process, then SIGKILL those that linger."""
        stop_processes(proc for _, proc in self.procs)


@pytest.fixture
def cloud_procs(cloud_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    """Cloud-plane processes for one test, stopped after it."""
    procs = Processes(cloud_env, tmp_path)
    yield procs
    procs.stop_all()


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 30.0,
               describe: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{describe()}")


@pytest.fixture
def cloud_ledger(tmp_path: Path, cloud_env: dict[str, str]) -> Iterator[Ledger]:
    """A SQLite ledger the cloud plane reads (DISPATCH_LEDGER_URL is set in cloud_env)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cloud_env["DISPATCH_LEDGER_URL"] = url
    led = Ledger.open(url)
    yield led
    led.close()


def heartbeat(ledger: Ledger, node: str, pool: str, *, running: tuple[str, ...] = (),
              last_job_at: str | None = None, started_at: str | None = None,
              draining: bool = False) -> None:
    """Feed the ledger a real node.heartbeat event body, as a worker publishes it."""
    body = events.node_event(
        Event.HEARTBEAT, node=node, pools=[pool],
        machine={"Cpus": 1, "Memory": 512, "Machine": node, "Pools": [pool]},
        slots_total=1, slots_free=0 if running else 1, memory_free_mb=512,
        running=[{"job_id": j, "attempt": 1, "started_at": events.now()} for j in running],
        waiting=0, draining=draining, jobs_done=3, last_job_at=last_job_at,
        started_at=started_at or events.now(), interval_s=5.0, lease_s=30.0)
    assert ledger.apply(body)


def offline(ledger: Ledger, node: str, reason: str = "drained") -> None:
    """Feed the ledger a node.offline event body."""
    assert ledger.apply(events.node_event(Event.OFFLINE, node=node, reason=reason))


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A real sshd on a free port of 127.0.0.1 with its keys in a temp dir."""
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()
