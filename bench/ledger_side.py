"""The ledger phase: Dispatch's latency and throughput with ``dispatch ledger`` running.

The same jobs, worker and timing as the no-ledger phases (:mod:`bench.dispatch_side`),
with a ledger service on a private PostgreSQL started first. The worker then finds the
ledger's queue and works as in production: each job's claim goes to the ledger
(mandatory, confirmed) and the job is acked once the claim is confirmed; its running and
exited events go out too; the ledger records a copy of each submission. A phase counts
as measured only once the ledger holds every job claimed and exited.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from bench import cpu, dispatch_side, stats
from dispatch.client import Client
from dispatch.ledger.models import JobRow

RECORD_TIMEOUT_S = 60.0


def recorded(db_url: str, pool: str) -> int:
    """Return how many of ``pool``'s jobs the ledger holds as claimed and exited."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            query = (select(func.count()).select_from(JobRow)
                     .where(JobRow.pool == pool, JobRow.state == "Exited",
                            JobRow.claimed_at.is_not(None)))
            return int(conn.scalar(query) or 0)
    finally:
        engine.dispose()


def wait_recorded(db_url: str, pool: str, jobs: int) -> int:
    """Wait until the ledger holds ``jobs`` claimed, exited jobs of ``pool``; return the count."""
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while (count := recorded(db_url, pool)) < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ledger holds {count} of {jobs} claimed jobs of {pool}")
        time.sleep(0.2)
    return count


def measure(url: str, work: Path, db_url: str, db_pid: int | None, *, latency_jobs: int,
            warmup: int, throughput_jobs: int, latency_slots: int = 2) -> dict[str, Any]:
    """Run the latency and the 2-slot throughput phase with a ledger; return the figures."""
    figures: dict[str, Any] = {"database": db_url.split("://", 1)[0]}
    print(f"ledger: latency, {latency_jobs} jobs one at a time ({latency_slots} slots), "
          "claims and events on", file=sys.stderr)

    def latency(client: Client, pool: str, _worker: Any, _ledger: Any) -> dict[str, Any]:
        samples = dispatch_side.run_latency(client, pool, latency_jobs, warmup)
        return {**stats.latency_figures(samples), "slots": latency_slots,
                "ledger_recorded": wait_recorded(db_url, pool, latency_jobs + warmup)}

    figures["latency"] = dispatch_side.phase(url, work, "ledger-latency", latency_slots,
                                             latency, ledger_db=db_url)
    print(f"ledger: throughput, {throughput_jobs} jobs in flight, 2 slots", file=sys.stderr)

    def throughput(client: Client, pool: str, worker: Any, ledger: Any) -> dict[str, Any]:
        dispatch_side.run_latency(client, pool, 0, warmup)  # warm the fresh worker, untimed
        meter = cpu.Meter(url, worker.pid)
        before = meter.read()
        behind = [cpu.tree_cpu_s(ledger.pid), cpu.tree_cpu_s(db_pid) if db_pid else 0.0]
        elapsed = dispatch_side.run_throughput(client, pool, throughput_jobs)
        used = cpu.per_job_ms(before, meter.read(), throughput_jobs)
        count = wait_recorded(db_url, pool, throughput_jobs + warmup)
        # The ledger's and the database's CPU, up to the moment every job was recorded.
        used["ledger"] = round((cpu.tree_cpu_s(ledger.pid) - behind[0])
                               / throughput_jobs * 1e3, 3)
        used["database"] = (round((cpu.tree_cpu_s(db_pid) - behind[1]) / throughput_jobs * 1e3,
                                  3) if db_pid else None)
        return {**stats.throughput_figures(throughput_jobs, elapsed), "slots": 2,
                "cpu_ms_per_job": used, "ledger_recorded": count}

    figures["throughput_2slot"] = dispatch_side.phase(url, work, "ledger-tp2", 2, throughput,
                                                      ledger_db=db_url)
    return figures
