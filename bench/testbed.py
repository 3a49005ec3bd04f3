"""What every benchmark phase stands on: one broker, worker subprocesses, and their queues.

The broker is ``DISPATCH_BROKER_URL`` when set, else a private RabbitMQ node started for
the run, so figures never depend on whatever system broker the machine has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import amqp.exceptions
import kombu

from dispatch import topology
from dispatch.localbroker import PrivateBroker

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def broker_url() -> Iterator[tuple[str, str]]:
    """Yield ``(url, where)``: the configured broker, or a private node for this run."""
    url = os.environ.get("DISPATCH_BROKER_URL")
    if url:
        yield url, "DISPATCH_BROKER_URL"
        return
    with PrivateBroker() as node:
        yield node.url, "private RabbitMQ node"


def wait_for_consumer(url: str, queue: str, proc: subprocess.Popen[bytes],
                      timeout_s: float = READY_TIMEOUT_S, consumers: int = 1) -> None:
    """Block until ``queue`` exists and has ``consumers``; fail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout_s
    with kombu.Connection(url) as conn:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}) before consuming {queue}")
            channel = conn.channel()
            try:
                _, _, present = channel.queue_declare(queue, passive=True)
                if present >= consumers:
                    return
            except amqp.exceptions.NotFound:
                pass  # not declared yet; the broker closed this channel
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no consumer on {queue} within {timeout_s:g} s")
            time.sleep(0.05)


def delete_queues(url: str, queues: Sequence[str]) -> None:
    """Delete the named queues this run made; a missing one is fine."""
    with kombu.Connection(url) as conn:
        for queue in queues:
            channel = conn.channel()
            with contextlib.suppress(amqp.exceptions.NotFound):
                channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                channel.close()


def snapshot(work: Path) -> Path:
    """Copy dispatch/, workers/, schemas/ and bench/ as they are now; return where to run workers.

    Workers started there import the copy, so every phase measures the same code even
    while the working tree is being edited.
    """
    src = work / "src"
    for package in ("dispatch", "workers", "schemas", "bench"):
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    return src


@contextlib.contextmanager
def subprocess_running(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                       cwd: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in ``cwd`` with output to ``log_path``; SIGTERM it on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a worker warmly with SIGTERM, then kill its process group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"bench: worker {proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ledger_running(url: str, db_url: str, work: Path, name: str,
                   pools: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``dispatch ledger`` (from the snapshot) until the block ends; yield its process.

    Nodes started inside the block find its queue and claim their jobs. Its queues are
    deleted afterwards: a ledger queue left behind would make later phases' nodes claim.
    """
    argv = [sys.executable, "-m", "dispatch", "ledger", "--broker", url, "--db", db_url,
            "--keep", "forever"]
    for pool in pools:
        argv += ["--pool", pool]
    try:
        with subprocess_running(argv, work / f"ledger-{name}.log", cwd=work / "src") as proc:
            wait_for_consumer(url, topology.ledger_control_queue(), proc)
            yield proc
    finally:
        delete_queues(url, [topology.ledger_queue(), topology.ledger_control_queue(),
                            topology.ledger_submitted_queue()])


def broker_version(url: str) -> str:
    """Return the broker's product and version as it announces them."""
    with kombu.Connection(url) as conn:
        conn.connect()
        props = conn.connection.server_properties
        return f"{props.get('product', '?')} {props.get('version', '?')}"
