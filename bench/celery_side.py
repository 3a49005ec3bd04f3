"""Celery's side: ``bench.celery_app.run_true`` on a prefork worker, ``rpc://`` results.

Timed like Dispatch: latency from ``delay()`` to the result taken by ``get()``, one
task in flight; throughput from the first ``delay()`` to the last result taken.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import cpu, stats, testbed
from bench.celery_app import app, run_true

TIMEOUT_S = 30.0
CONCURRENCY = 2


def worker_argv(queue: str) -> list[str]:
    """Return the Celery worker command line: prefork, 2 processes, warnings only."""
    celery = str(Path(sys.executable).with_name("celery"))
    return [celery, "-A", "bench.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(CONCURRENCY), "--loglevel", "WARNING", "-Q", queue,
            "--without-mingle", "--without-gossip", "--hostname", f"{queue}@%h"]


def _check(payload: Any) -> None:
    if not isinstance(payload, str) or not base64.b64decode(payload).startswith(b"PK"):
        raise RuntimeError(f"bench task returned no zip: {payload!r:.80}")


def run_latency(task: Any, jobs: int, warmup: int) -> list[float]:
    """Return the round trips, in seconds, of ``jobs`` tasks run one at a time."""
    samples: list[float] = []
    for i in range(warmup + jobs):
        started = time.perf_counter()
        payload = task.delay().get(timeout=TIMEOUT_S)
        elapsed = time.perf_counter() - started
        _check(payload)
        if i >= warmup:
            samples.append(elapsed)
    return samples


def run_throughput(task: Any, jobs: int) -> float:
    """Send ``jobs`` tasks, then take every result in order; return the seconds it took."""
    started = time.perf_counter()
    results = [task.delay() for _ in range(jobs)]
    payloads = [r.get(timeout=TIMEOUT_S) for r in results]
    elapsed = time.perf_counter() - started
    for payload in payloads:
        _check(payload)
    return elapsed


def measure(url: str, work: Path, *, latency_jobs: int, warmup: int,
            throughput_jobs: int) -> dict[str, Any]:
    """Start one Celery worker on a fresh queue; run the latency and throughput phases."""
    queue = f"bench.celery.{uuid.uuid4().hex[:8]}"
    app.conf.update(broker_url=url, task_default_queue=queue)
    env = {"BENCH_BROKER_URL": url, "BENCH_CELERY_QUEUE": queue}
    figures: dict[str, Any] = {}
    try:
        with testbed.subprocess_running(worker_argv(queue), work / "worker-celery.log",
                                        env) as proc:
            testbed.wait_for_consumer(url, queue, proc)
            print(f"celery: latency, {latency_jobs} tasks one at a time", file=sys.stderr)
            samples = run_latency(run_true, latency_jobs, warmup)
            figures["latency"] = {**stats.latency_figures(samples), "concurrency": CONCURRENCY}
            print(f"celery: throughput, {throughput_jobs} tasks in flight", file=sys.stderr)
            meter = cpu.Meter(url, proc.pid)
            before = meter.read()
            elapsed = run_throughput(run_true, throughput_jobs)
            figures["throughput"] = {
                **stats.throughput_figures(throughput_jobs, elapsed), "concurrency": CONCURRENCY,
                "cpu_ms_per_job": cpu.per_job_ms(before, meter.read(), throughput_jobs)}
    finally:
        app.close()
        testbed.delete_queues(url, [queue])
    return figures
