"""Dispatch's side: a ``dispatch worker`` subprocess per phase, timed from ``Client.submit``.

Latency is one job in flight, from ``submit`` to the final reply taken by
``handle.wait()``. Throughput submits every job with ``submit_many`` (each job still
confirmed by the broker, the confirms awaited by the window), then collects every
final reply.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import cpu, stats, testbed
from dispatch import topology
from dispatch.client import Client
from dispatch.job import JobSpec

TIMEOUT_S = 30.0


UNPRIVILEGED = "nobody"


def worker_argv(url: str, pool: str, slots: int, workdir_root: Path,
                run_as: str | None) -> list[str]:
    """Return the command line of one execute node, as an operator would start it.

    With ``run_as`` (and the bench running as root), the worker itself runs as that
    account, as Celery's workers run tasks as their own user: no per-job user switch.
    Without it, a root worker switches each job to ``nobody`` (the default ``--user``).
    """
    argv = [sys.executable, "-m", "dispatch", "worker", "--broker", url, "--pool", pool,
            "--slots", str(slots), "--workdir-root", str(workdir_root)]
    if run_as and os.geteuid() == 0:
        account = pwd.getpwnam(run_as)
        argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--clear-groups", *argv]
        os.chown(workdir_root, account.pw_uid, account.pw_gid)
    return argv


def _spec(pool: str) -> JobSpec:
    return JobSpec("/bin/true", pool=pool)


def _check(result: Any) -> None:
    if not result.ok or not result.archive:
        raise RuntimeError(f"bench job failed: {result!r}")


def run_latency(client: Client, pool: str, jobs: int, warmup: int) -> list[float]:
    """Return the round trips, in seconds, of ``jobs`` jobs run one at a time."""
    samples: list[float] = []
    spec = _spec(pool)
    for i in range(warmup + jobs):
        started = time.perf_counter()
        result = client.submit(spec).wait(timeout_s=TIMEOUT_S)
        elapsed = time.perf_counter() - started
        _check(result)
        if i >= warmup:
            samples.append(elapsed)
    return samples


def run_throughput(client: Client, pool: str, jobs: int) -> float:
    """Submit ``jobs`` jobs, then take every final reply; return the seconds it all took."""
    spec = _spec(pool)
    started = time.perf_counter()
    # As a user submits many jobs (an array, a list): confirms awaited by the window.
    pending = {handle.job_id for handle in client.submit_many([spec] * jobs)}
    while pending:
        # The client is this phase's alone, so "any job" means "one of ours".
        update = client.next_update(None, timeout_s=TIMEOUT_S)
        if update is None:
            raise RuntimeError(f"{len(pending)} jobs without a final reply after {TIMEOUT_S} s")
        if update.is_final:
            if update.exit_code != 0 or not update.archive:
                raise RuntimeError(f"bench job {update.job_id} failed: {update.state.value}")
            pending.discard(update.job_id)
    return time.perf_counter() - started


def phase(url: str, work: Path, name: str, slots: int, body: Any,
           run_as: str | None = UNPRIVILEGED, ledger_db: str | None = None) -> Any:
    """Run ``body(client, pool, worker, ledger)`` against a fresh pool served by a fresh worker.

    The worker runs from the snapshot in ``work/src`` (see ``testbed.snapshot``). With
    ``ledger_db`` a ``dispatch ledger`` on that database runs first (``ledger`` is its
    process, else None), so the worker claims every job and sends every job's events.
    """
    pool = f"bench-{uuid.uuid4().hex[:8]}-{name}"
    root = work / f"jobs-{name}"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    argv = worker_argv(url, pool, slots, root, run_as)
    queues = [topology.pool_queue(pool)]
    try:
        with contextlib.ExitStack() as stack:
            ledger = None if ledger_db is None else stack.enter_context(
                testbed.ledger_running(url, ledger_db, work, name, [pool]))
            proc = stack.enter_context(testbed.subprocess_running(
                argv, work / f"worker-{name}.log", cwd=work / "src"))
            testbed.wait_for_consumer(url, topology.pool_queue(pool), proc)
            with Client(url) as client:
                queues.append(client.reply_queue)
                return body(client, pool, proc, ledger)
    finally:
        testbed.delete_queues(url, queues)


def measure(url: str, work: Path, *, latency_jobs: int, warmup: int,
            throughput_jobs: int, latency_slots: int = 2) -> dict[str, Any]:
    """Run the latency phase and the 1- and 2-slot throughput phases; return the figures.

    Workers run from ``work/src``, which ``testbed.snapshot(work)`` must have filled.
    """
    figures: dict[str, Any] = {}
    print(f"dispatch: latency, {latency_jobs} jobs one at a time ({latency_slots} slots)",
          file=sys.stderr)
    samples = phase(url, work, "latency", latency_slots,
                     lambda c, p, *_: run_latency(c, p, latency_jobs, warmup))
    figures["latency"] = {**stats.latency_figures(samples), "slots": latency_slots,
                          "worker_user": UNPRIVILEGED}
    print("dispatch: latency again, root worker switching each job to nobody",
          file=sys.stderr)
    samples = phase(url, work, "latency-root", latency_slots,
                     lambda c, p, *_: run_latency(c, p, latency_jobs, warmup), run_as=None)
    figures["latency_root_switching_user"] = {**stats.latency_figures(samples),
                                              "slots": latency_slots, "worker_user": "root"}
    for slots in (1, 2):
        print(f"dispatch: throughput, {throughput_jobs} jobs in flight, {slots} slot(s)",
              file=sys.stderr)

        def body(client: Client, pool: str, worker: Any, _ledger: Any) -> dict[str, Any]:
            run_latency(client, pool, 0, warmup)  # warm the fresh worker, untimed
            meter = cpu.Meter(url, worker.pid)
            before = meter.read()
            elapsed = run_throughput(client, pool, throughput_jobs)
            return {**stats.throughput_figures(throughput_jobs, elapsed),
                    "cpu_ms_per_job": cpu.per_job_ms(before, meter.read(), throughput_jobs)}

        figures[f"throughput_{slots}slot"] = {**phase(url, work, f"tp{slots}", slots, body),
                                              "slots": slots}
    return figures
