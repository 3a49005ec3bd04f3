"""Scale, part 2: 1, 5, then 20 single-slot nodes against one broker and one ledger.

One ``dispatch ledger`` on PostgreSQL runs through every step, so nodes claim their
jobs and send their events as in production. Each step starts its nodes (1 slot each,
as ``nobody``, each its own name and job directory), warms them, then keeps twice as
many jobs in flight as there are slots, submitting one job each time one finishes:
every node always has a job queued for it, and each job's round trip (submit to final
reply) still means something. CPU per job is read for the broker, all nodes together,
the client, the ledger and the database, to show which one runs out first.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import cpu, ledger_side, scale_queue, stats, testbed
from dispatch import topology
from dispatch.client import Client
from dispatch.job import JobSpec

REPLY_TIMEOUT_S = 60.0
WARMUP_PER_NODE = 5


def closed_loop(client: Client, spec: JobSpec, jobs: int, in_flight: int) -> tuple[float,
                                                                                  list[float]]:
    """Run ``jobs`` jobs, ``in_flight`` at a time; return the seconds and each round trip."""
    sent_at: dict[str, float] = {}
    samples: list[float] = []

    def send(count: int) -> None:
        now = time.perf_counter()
        for handle in client.submit_many([spec] * count):
            sent_at[handle.job_id] = now

    started = time.perf_counter()
    send(min(in_flight, jobs))
    submitted = min(in_flight, jobs)
    while len(samples) < jobs:
        update = client.next_update(None, timeout_s=REPLY_TIMEOUT_S)
        if update is None:
            raise RuntimeError(f"{len(sent_at)} jobs without a final reply after "
                               f"{REPLY_TIMEOUT_S:g} s")
        if not update.is_final:
            continue
        if update.exit_code != 0 or not update.archive:
            raise RuntimeError(f"bench job {update.job_id} failed: {update.state.value}")
        samples.append(time.perf_counter() - sent_at.pop(update.job_id))
        if submitted < jobs:
            send(1)
            submitted += 1
    return time.perf_counter() - started, samples


def _step(url: str, work: Path, client: Client, pool: str, nodes: int, jobs: int,
          behind: tuple[int, int | None]) -> dict[str, Any]:
    """Start ``nodes`` nodes, warm them, run ``jobs`` jobs; return the step's figures."""
    spec = JobSpec("/bin/true", pool=pool)
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(scale_queue.node_running(
            url, work, pool, f"n{nodes}-{i}", 1)) for i in range(nodes)]
        testbed.wait_for_consumer(url, topology.pool_queue(pool), procs[0], consumers=nodes)
        closed_loop(client, spec, WARMUP_PER_NODE * nodes, 2 * nodes)
        meter = cpu.Meter(url, [p.pid for p in procs])
        ledger_pid, db_pid = behind
        before = (meter.read(), cpu.tree_cpu_s(ledger_pid),
                  cpu.tree_cpu_s(db_pid) if db_pid else 0.0)
        elapsed, samples = closed_loop(client, spec, jobs, 2 * nodes)
        used = cpu.per_job_ms(before[0], meter.read(), jobs)
        used["ledger"] = round((cpu.tree_cpu_s(ledger_pid) - before[1]) / jobs * 1e3, 3)
        used["database"] = (round((cpu.tree_cpu_s(db_pid) - before[2]) / jobs * 1e3, 3)
                            if db_pid else None)
        _stop_all(procs)
    return {"nodes": nodes, "in_flight": 2 * nodes, **stats.throughput_figures(jobs, elapsed),
            **{k: v for k, v in stats.latency_figures(samples).items() if k != "jobs"},
            "cpu_ms_per_job": used}


def _stop_all(procs: list[Any]) -> None:
    """SIGTERM every node at once, so twenty nodes stop in one node's time."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(timeout=testbed.STOP_TIMEOUT_S)


def measure(url: str, work: Path, db_url: str, db_pid: int | None, *,
            node_counts: list[int], jobs_per_step: int) -> dict[str, Any]:
    """Run one step per entry of ``node_counts`` with one ledger; return the steps."""
    pool = f"bench-{uuid.uuid4().hex[:8]}-nodes"
    steps: list[dict[str, Any]] = []
    queues = [topology.pool_queue(pool)]
    try:
        with testbed.ledger_running(url, db_url, work, "scale", [pool]) as ledger, \
                Client(url) as client:
            queues.append(client.reply_queue)
            for nodes in node_counts:
                print(f"scale: {nodes} node(s) of 1 slot, {jobs_per_step} jobs, ledger on",
                      file=sys.stderr)
                steps.append(_step(url, work, client, pool, nodes, jobs_per_step,
                                   (ledger.pid, db_pid)))
            total = sum(s["jobs"] + WARMUP_PER_NODE * s["nodes"] for s in steps)
            recorded = ledger_side.wait_recorded(db_url, pool, total)
    finally:
        testbed.delete_queues(url, queues)
    return {"pool": pool, "steps": steps, "ledger_recorded": recorded}
