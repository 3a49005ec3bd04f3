"""Scale, part 1: many jobs queued before any node starts, then drained by a few nodes.

The pool's queue is declared first (as a node would), then every job is submitted with
``Client.submit_many`` in windows of 1,000 before any node runs: that gives the submit
rate and what the broker's memory does with the whole backlog queued. Then the nodes
start and drain it while this process, the client, takes every final reply. The
client's and each node's resident memory are sampled at 1%, 10%, 50% and 100% of the
jobs (1k, 10k, 50k and 100k of 100,000): submitted for the client while submitting,
finished for both while draining. No ledger runs here (its own phases are separate).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu

from bench import cpu, dispatch_side, memory, testbed
from dispatch import broker, topology
from dispatch.client import Client
from dispatch.job import JobSpec

SUBMIT_WINDOW = 1000
REPLY_TIMEOUT_S = 60.0


def marks(jobs: int) -> list[int]:
    """Return the job counts at which memory is sampled: 1%, 10%, 50% and all of ``jobs``."""
    return sorted({max(1, jobs * percent // 100) for percent in (1, 10, 50, 100)})


def _queue_depth(url: str, queue: str) -> int:
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        try:
            _, depth, _ = channel.queue_declare(queue, passive=True)
            return int(depth)
        finally:
            channel.close()


def _submit(client: Client, spec: JobSpec, jobs: int, at: list[int]) -> tuple[float, list[Any]]:
    """Submit ``jobs`` jobs in windows; return the seconds taken and the RSS at each mark."""
    samples: list[Any] = []
    done = 0
    started = time.perf_counter()
    while done < jobs:
        window = min(SUBMIT_WINDOW, jobs - done, *(m - done for m in at if m > done))
        client.submit_many([spec] * window)  # handles dropped: a user's script keeps ids only
        done += window
        if done in at:
            samples.append({"jobs": done, "client_mib": memory.rss_mib()})
    return time.perf_counter() - started, samples


def _drain(client: Client, jobs: int, at: list[int], nodes: list[Any]) -> list[Any]:
    """Take ``jobs`` final replies; return the client's and nodes' RSS at each mark."""
    samples: list[Any] = []
    done = 0
    while done < jobs:
        update = client.next_update(None, timeout_s=REPLY_TIMEOUT_S)
        if update is None:
            raise RuntimeError(f"{jobs - done} jobs without a final reply after "
                               f"{REPLY_TIMEOUT_S:g} s")
        if not update.is_final:
            continue
        if update.exit_code != 0 or not update.archive:
            raise RuntimeError(f"bench job {update.job_id} failed: {update.state.value}")
        done += 1
        if done in at:
            samples.append({"jobs": done, "client_mib": memory.rss_mib(),
                            "nodes_mib": [memory.rss_mib(n.pid) for n in nodes]})
    return samples


def measure(url: str, work: Path, *, jobs: int, nodes: int, slots: int) -> dict[str, Any]:
    """Queue ``jobs`` jobs, then drain them with ``nodes`` nodes of ``slots`` slots each."""
    pool = f"bench-{uuid.uuid4().hex[:8]}-queued"
    at = marks(jobs)
    spec = JobSpec("/bin/true", pool=pool)
    broker_pid = cpu.Meter(url, []).broker_pid
    figures: dict[str, Any] = {"jobs": jobs, "nodes": nodes, "slots_per_node": slots,
                               "broker_mib": {"before": memory.rss_mib(broker_pid)}}
    queues = [topology.pool_queue(pool)]
    try:
        with Client(url) as client:
            queues.append(client.reply_queue)
            with kombu.Connection(url) as conn:
                broker.declare_pool(conn.default_channel, pool)
            print(f"scale: submitting {jobs} jobs before any node runs", file=sys.stderr)
            elapsed, submitting = _submit(client, spec, jobs, at)
            figures["submit"] = {"elapsed_s": round(elapsed, 3),
                                 "jobs_per_s": round(jobs / elapsed, 1),
                                 "queued": _queue_depth(url, queues[0]), "rss": submitting}
            figures["broker_mib"]["queued"] = memory.rss_mib(broker_pid)
            print(f"scale: draining with {nodes} nodes of {slots} slot(s)", file=sys.stderr)
            figures["drain"] = _drain_with_nodes(url, work, client, pool, jobs, at, nodes, slots)
            figures["broker_mib"]["drained"] = memory.rss_mib(broker_pid)
    finally:
        testbed.delete_queues(url, queues)
    figures["rss_spread_mib"] = _spreads(figures)
    return figures


def _drain_with_nodes(url: str, work: Path, client: Client, pool: str, jobs: int,
                      at: list[int], nodes: int, slots: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        procs = [stack.enter_context(node_running(url, work, pool, f"queued-{i}", slots))
                 for i in range(nodes)]
        samples = _drain(client, jobs, at, procs)
        elapsed = time.perf_counter() - started
    return {"elapsed_s": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed, 1),
            "rss": samples}


@contextlib.contextmanager
def node_running(url: str, work: Path, pool: str, name: str,
                 slots: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run one node (as ``nobody``, from the snapshot) named ``name`` serving ``pool``."""
    root = work / f"jobs-{name}"
    root.mkdir(mode=0o755)
    argv = [*dispatch_side.worker_argv(url, pool, slots, root, dispatch_side.UNPRIVILEGED),
            "--name", name]
    with testbed.subprocess_running(argv, work / f"worker-{name}.log", cwd=work / "src") as proc:
        yield proc


def _spreads(figures: dict[str, Any]) -> dict[str, float | None]:
    """Each process's highest minus lowest RSS over its marks (the 20 MiB question)."""
    submitting, draining = figures["submit"]["rss"], figures["drain"]["rss"]
    out = {"client_submitting": memory.spread_mib([s["client_mib"] for s in submitting]),
           "client_draining": memory.spread_mib([s["client_mib"] for s in draining])}
    for i in range(figures["nodes"]):
        out[f"node_{i}"] = memory.spread_mib([s["nodes_mib"][i] for s in draining])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale_queue [JOBS]``: this phase alone, its figures as JSON."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else argv
    jobs = int(args[0]) if args else 100_000
    work = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # jobs run as nobody and must reach their directories
    try:
        testbed.snapshot(work)
        with testbed.broker_url() as (url, _):
            figures = measure(url, work, jobs=jobs, nodes=2, slots=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
