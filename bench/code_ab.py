"""``python -m bench.code_ab``: two versions of Dispatch, alternating phases, one broker.

On a shared machine the load moves by more within minutes than one change moves the
figures, so a change is measured against the code before it in turns: A, B, B, A, A,
B, ... Each arm is a snapshot of ``dispatch/``, ``workers/`` and ``schemas/`` at a git
revision (``--a``, ``--b``; ``--b`` defaults to the working tree) with this tree's
``bench/``. Each phase runs in a subprocess started in its arm's snapshot, so the
client, the node and the ledger are all that arm's code. Per pair: latency (one job in
flight, p50 and p99) and throughput (2 slots, jobs/s, with the broker's and worker's
CPU per job), and with ``--ledger`` the latency phase again with ``dispatch ledger``
running (on one private PostgreSQL), and the throughput phase with it too. Prints every
pair, then the medians and B/A.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import cpu, dispatch_side, postgres, stats, testbed

#: What each pair measures, and the figure of each kept for the summary.
FIGURES = (("latency", "p50_ms"), ("latency", "p99_ms"), ("throughput", "jobs_per_s"),
           ("throughput", "broker_ms"), ("throughput", "worker_ms"),
           ("throughput", "client_ms"), ("ledger", "p50_ms"), ("ledger", "p99_ms"),
           ("ledger-throughput", "jobs_per_s"), ("ledger-throughput", "worker_ms"),
           ("ledger-throughput", "broker_ms"))


def _arm(work: Path, name: str, rev: str | None) -> Path:
    """Snapshot ``rev`` (None: the working tree) into ``work/name/src``; return ``work/name``."""
    home = work / name
    src = home / "src"
    src.mkdir(parents=True)
    if rev is None:
        for package in ("dispatch", "workers", "schemas"):
            shutil.copytree(testbed.REPO / package, src / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(testbed.REPO), "archive", rev, "dispatch",
                                  "workers", "schemas"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    shutil.copytree(testbed.REPO / "bench", src / "bench",
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
    home.chmod(0o755)
    return home


def _phase(kind: str, url: str, home: Path, name: str, jobs: int, db_url: str | None,
           db_pid: int | None) -> dict[str, Any]:
    """Run one phase in this process (started in the arm's snapshot); return its figures."""
    def latency(client: Any, pool: str, *_: Any) -> dict[str, Any]:
        return stats.latency_figures(dispatch_side.run_latency(client, pool, jobs, 20))

    def throughput(client: Any, pool: str, worker: Any, _ledger: Any) -> dict[str, Any]:
        dispatch_side.run_latency(client, pool, 0, 50)
        meter = cpu.Meter(url, worker.pid)
        before = meter.read()
        elapsed = dispatch_side.run_throughput(client, pool, jobs)
        used = cpu.per_job_ms(before, meter.read(), jobs)
        return {**stats.throughput_figures(jobs, elapsed), "broker_ms": used.get("broker"),
                "worker_ms": used.get("worker"), "client_ms": used.get("client")}

    body = throughput if kind.endswith("throughput") else latency
    figures: dict[str, Any] = dispatch_side.phase(
        url, home, name, 2, body, ledger_db=db_url if kind.startswith("ledger") else None)
    return figures


def _run_phase(kind: str, url: str, home: Path, name: str, jobs: int,
               db_url: str | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.code_ab", "--phase", kind, "--url", url,
            "--home", str(home), "--name", name, "--jobs", str(jobs)]
    if db_url:
        argv += ["--db", db_url]
    done = subprocess.run(argv, cwd=home / "src", check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@contextmanager
def _database(wanted: bool) -> Iterator[str | None]:
    if not wanted:
        yield None
        return
    with postgres.server() as server:
        yield postgres.create_database(server.url)


def _summary(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["median over the pairs:", f"{'figure':<24}{'A':>10}{'B':>10}{'B/A':>8}"]
    for kind, key in FIGURES:
        got = {arm: [r[kind][key] for r in rows[arm] if kind in r and r[kind].get(key)]
               for arm in ("A", "B")}
        if not got["A"] or not got["B"]:
            continue
        a, b = statistics.median(got["A"]), statistics.median(got["B"])
        lines.append(f"{kind + ' ' + key:<24}{a:>10.3f}{b:>10.3f}{b / a:>8.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the pairs and print them; exit 0 (a measurement, no target)."""
    parser = argparse.ArgumentParser(prog="bench.code_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=False, help="git revision of arm A (the code before)")
    parser.add_argument("--b", help="git revision of arm B (default: the working tree)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--throughput-jobs", type=int, default=1000)
    parser.add_argument("--ledger", action="store_true",
                        help="add latency and throughput phases with a ledger")
    parser.add_argument("--work-root", type=Path, default=Path("/var/tmp"),
                        help="where snapshots and job directories go (default /var/tmp; "
                             "/dev/shm puts job directories on tmpfs)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # one phase, inside an arm's snapshot
        print(json.dumps(_phase(args.phase, args.url, args.home, args.name, args.jobs,
                                args.db, None)))
        return 0
    if not args.a:
        parser.error("--a REV is required")
    work = Path(tempfile.mkdtemp(prefix="dispatch-ab-", dir=args.work_root))
    work.chmod(0o755)
    homes = {"A": _arm(work, "A", args.a), "B": _arm(work, "B", args.b)}
    kinds = [("latency", args.latency_jobs), ("throughput", args.throughput_jobs)]
    if args.ledger:
        kinds += [("ledger", args.latency_jobs), ("ledger-throughput", args.throughput_jobs)]
    rows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    try:
        with ExitStack() as stack:
            url, _ = stack.enter_context(testbed.broker_url())
            db_url = stack.enter_context(_database(args.ledger))
            for pair in range(args.pairs):
                order = ("A", "B") if pair % 2 == 0 else ("B", "A")
                for arm in order:
                    row = {kind: _run_phase(kind, url, homes[arm], f"{arm}{pair}-{kind}", jobs,
                                            db_url if kind.startswith("ledger") else None)
                           for kind, jobs in kinds}
                    rows[arm].append(row)
                    print(f"pair {pair + 1} {arm}: " + ", ".join(
                        f"{kind} {key} {row[kind][key]}" for kind, key in FIGURES
                        if kind in row and row[kind].get(key) is not None), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(_summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
