"""``dispatch demo``: the whole fast path on this machine, start to finish.

Uses the configured broker, else one on localhost, else a private RabbitMQ node
it starts (installing Debian's package first when it is missing and it may);
starts an execute node as a subprocess; submits sample jobs; prints the results;
stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import click

from dispatch import localbroker
from dispatch.broker import safe_url
from dispatch.client import Client, JobHandle
from dispatch.config import Settings
from dispatch.errors import BrokerUnreachableError, UnroutableError
from dispatch.job import JobSpec, Resources
from dispatch.progress import Progress, table
from dispatch.result import JobResult


@click.command("demo")
@click.option("--broker", envvar="DISPATCH_BROKER_URL", help="Use this broker.")
@click.option("--private-broker", is_flag=True,
              help="Always start a private RabbitMQ node, even if one is reachable.")
@click.option("--no-install", is_flag=True, help="Never apt-get install rabbitmq-server.")
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Unpack the demo's results here instead of a temporary directory.")
def demo_command(broker: str | None, private_broker: bool, no_install: bool,
                 keep_dir: Path | None) -> None:
    """Run sample jobs end to end: broker, worker, client, results."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(_broker(broker, private_broker, not no_install))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispatch-demo.")))
        work.chmod(0o755)  # a root worker runs jobs as nobody, who must reach their directories
        pool = f"demo-{uuid.uuid4().hex[:8]}"
        stack.enter_context(_worker(url, pool, work / "jobs"))
        client = stack.enter_context(Client(url))
        results = _run_samples(client, pool, work)
        out = keep_dir or work / "results"
        rows = []
        for label, result in results:
            result.extract(out / result.job_id)
            stdout = (out / result.job_id / "job.out")
            text = stdout.read_text().strip() if stdout.exists() else ""
            rows.append({"job": label, "state": result.state.value,
                         "exit": result.exit_code if not result.exit_signal
                         else f"signal {result.exit_signal}",
                         "took": f"{(result.duration_s or 0) * 1000:.1f} ms",
                         "output / reason": (result.reason or text)[:60]})
        click.echo(table(rows, ["job", "state", "exit", "took", "output / reason"]))
        if keep_dir:
            click.echo(f"results unpacked in {keep_dir}")
    click.echo("demo finished; everything it started is stopped")


@contextlib.contextmanager
def _broker(url: str | None, private: bool, may_install: bool) -> Iterator[str]:
    settings = Settings.from_env()
    candidate = url or settings.broker_url
    if not private and (url or settings.broker_configured):
        click.echo(f"broker: {safe_url(candidate)} (configured)")
        yield candidate
        return
    if not private and localbroker.broker_reachable(candidate):
        click.echo(f"broker: {safe_url(candidate)} (found on localhost)")
        yield candidate
        return
    if not localbroker.rabbitmq_installed():
        if not may_install:
            raise BrokerUnreachableError("no broker reachable and rabbitmq-server is not "
                                         "installed (run without --no-install, as root)")
        click.echo("installing Debian's rabbitmq-server ...")
        localbroker.install_rabbitmq()
    click.echo("starting a private RabbitMQ node ...")
    with localbroker.PrivateBroker() as node:
        click.echo(f"broker: {safe_url(node.url)} (private, stopped at the end)")
        yield node.url


@contextlib.contextmanager
def _worker(url: str, pool: str, workdir_root: Path) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "dispatch", "worker", "--broker", url, "--pool", pool,
           "--slots", "2", "--workdir-root", str(workdir_root), "--name", "demo-node"]
    env = {**os.environ, "DISPATCH_BROKER_URL": url}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    click.echo(f"worker: pid {proc.pid}, pool {pool}, 2 slots")
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _samples(pool: str, work: Path) -> list[tuple[str, JobSpec]]:
    data = work / "words.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n")
    return [
        ("echo", JobSpec("echo", ("hello", "from", "dispatch"), pool=pool)),
        ("input file", JobSpec("wc", ("-w", "words.txt"), inputs=(data,), pool=pool)),
        ("shell, exit 3", JobSpec("/bin/sh", ("-c", "echo failing on purpose; exit 3"),
                                  pool=pool)),
        ("time limit 1s", JobSpec("sleep", ("30",), time_limit_s=1, pool=pool)),
        ("needs 64 cores", JobSpec("true", resources=Resources(cpus=64), pool=pool)),
        ("Requirements", JobSpec("true", requirements='OpSys == "WINDOWS"', pool=pool)),
    ]


def _run_samples(client: Client, pool: str, work: Path) -> list[tuple[str, JobResult]]:
    samples = _samples(pool, work)
    handles = [(label, _submit_when_ready(client, spec)) for label, spec in samples]
    progress = Progress()
    results = []
    for n, (label, handle) in enumerate(handles):
        progress.bar(n, len(handles), f"waiting for {label}")
        results.append((label, handle.wait(timeout_s=60)))
    progress.bar(len(handles), len(handles), "done")
    progress.close()
    return results


def _submit_when_ready(client: Client, spec: JobSpec, timeout_s: float = 30.0) -> JobHandle:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit(spec)
        except UnroutableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # the worker has not declared its pool queue yet
