"""``python -m bench``: Dispatch and Celery doing the same work against the same broker.

Prints a table of latency and throughput figures with Dispatch's advantage over
Celery, and writes the run as JSON to ``bench/results/<timestamp>.json``.

With ``--rounds N`` every system is measured N times, in turns (the order reversed
every other round), and the run reports each figure's median over the rounds and each
ratio's median over the rounds' own ratios: on a shared machine whose speed drifts
within minutes, a ratio taken within a round cancels most of the drift.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    celery_side,
    dispatch_side,
    ledger_side,
    minimal,
    postgres,
    report,
    scale,
    testbed,
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=1000,
                        help="jobs timed one at a time (default: 1000)")
    parser.add_argument("--warmup", type=int, default=50,
                        help="untimed jobs before each timed phase (default: 50)")
    parser.add_argument("--throughput-jobs", type=int, default=2000,
                        help="jobs in flight at once (default: 2000)")
    parser.add_argument("--rounds", type=_at_least_one, default=1,
                        help="measure every system this many times, in turns, and report "
                             "medians (default: 1)")
    parser.add_argument("--skip-celery", action="store_true", help="leave Celery out")
    parser.add_argument("--skip-floor", action="store_true",
                        help="leave out the minimal dispatchers (bench/minimal.py)")
    parser.add_argument("--skip-ledger", action="store_true",
                        help="leave out the phase with a ledger (claims and events on)")
    parser.add_argument("--ledger-db", metavar="URL",
                        help="ledger database for the ledger phase (default: a private "
                             "PostgreSQL server started for the run)")
    parser.add_argument("--scale", action="store_true",
                        help="run the scale phases instead (bench/scale.py): a queued "
                             "backlog, 1 -> 5 -> 20 nodes with a ledger, q/history over "
                             "a million jobs")
    parser.add_argument("--scale-jobs", type=int, default=100_000,
                        help="jobs queued before any node starts (default: 100000)")
    parser.add_argument("--scale-nodes", type=_counts, default=[1, 5, 20],
                        help="single-slot node counts, comma-separated (default: 1,5,20)")
    parser.add_argument("--scale-node-jobs", type=int, default=2000,
                        help="timed jobs at each node count (default: 2000)")
    parser.add_argument("--scale-ledger-jobs", type=int, default=1_000_000,
                        help="finished jobs put in the ledger for q/history (default: "
                             "1000000)")
    parser.add_argument("--results", type=Path, default=report.RESULTS_DIR,
                        help="where the run's JSON goes (default: bench/results)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the worker logs and job directories under /var/tmp")
    return parser.parse_args(argv)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return value


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("give node counts of 1 or more, e.g. 1,5,20")
    return counts


def _machine(url: str) -> dict[str, Any]:
    return {"cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "broker": testbed.broker_version(url)}


def _source() -> dict[str, Any]:
    """Return the commit measured and the files changed since, as the snapshot is taken."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=testbed.REPO, capture_output=True, text=True,
                              check=False)
        return done.stdout

    changed = git("status", "--porcelain", "--", "dispatch", "workers", "schemas").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line[3:] for line in changed if line.strip()]}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _ledger_phase(args: argparse.Namespace, url: str, work: Path,
                  sizes: dict[str, int]) -> dict[str, Any] | None:
    """Measure Dispatch with a ledger, on ``--ledger-db`` or a private PostgreSQL."""
    if args.skip_ledger:
        return None
    if args.ledger_db:
        return ledger_side.measure(url, work, args.ledger_db, None, **sizes)
    if not postgres.installed():
        print(f"bench: no PostgreSQL in {postgres.PG_BIN}; ledger phase left out",
              file=sys.stderr)
        return None
    with postgres.server() as server:
        figures = ledger_side.measure(url, work, postgres.create_database(server.url),
                                      server.pid(), **sizes)
        return {**figures, "database": "PostgreSQL 15, private server"}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Measure everything against one broker; return the run as a JSON-ready dict."""
    now = dt.datetime.now(dt.UTC)
    sizes = {"latency_jobs": args.latency_jobs, "warmup": args.warmup,
             "throughput_jobs": args.throughput_jobs}
    testbed.snapshot(work)  # the code every Dispatch worker of this run will import
    source = _source()
    if args.scale:
        return _scale_run(args, work, now, source)
    phases: dict[str, Callable[[str, Path], dict[str, Any] | None]] = {
        "dispatch": lambda url, at: dispatch_side.measure(url, at, **sizes),
        "ledger": lambda url, at: _ledger_phase(args, url, at, sizes),
        "celery": lambda url, at: None if args.skip_celery else celery_side.measure(
            url, at, **sizes),
        "minimal": lambda url, at: None if args.skip_floor else minimal.measure(
            url, at, **sizes),
    }
    rounds: list[dict[str, Any]] = []
    with testbed.broker_url() as (url, where):
        print(f"bench: broker from {where}; work in {work}", file=sys.stderr)
        machine = {**_machine(url), "broker_source": where}
        load = {"start": _load()}
        for number in range(args.rounds):
            order = list(phases) if number % 2 == 0 else list(reversed(phases))
            at = work
            if args.rounds > 1:  # logs and job directories of its own, the same snapshot
                at = work / f"round-{number + 1}"
                at.mkdir(mode=0o755)
                (at / "src").symlink_to(work / "src")
            measured = {}
            for name in order:
                measured[name] = phases[name](url, at)
                load[f"after_{name}" + (f"_{number + 1}" if args.rounds > 1 else "")] = _load()
            rounds.append(measured)
        load["end"] = _load()
    per_round = [report.round_ratios(r["dispatch"], r["celery"], r["ledger"], r["minimal"])
                 for r in rounds]
    dispatch, ledger, celery, floor = (report.median_figures([r[name] for r in rounds])
                                       for name in phases)
    ratios = report.median_figures(per_round)
    advantage = ratios.get("advantage")
    return {
        "timestamp": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_1_5_15min": load,
        "source": source,
        "sizes": sizes,
        "dispatch": dispatch,
        "ledger": ledger,
        "ledger_ratio": ratios.get("ledger_ratio"),
        "celery": celery,
        "minimal": floor,
        "advantage": advantage,
        "of_bare": ratios.get("of_bare"),
        "rounds": args.rounds,
        "per_round": per_round if args.rounds > 1 else None,
        "per_round_figures": rounds if args.rounds > 1 else None,
        "targets": report.targets(dispatch, advantage, ratios.get("ledger_ratio"),
                                  ratios.get("of_bare")),
    }


def _scale_run(args: argparse.Namespace, work: Path, now: dt.datetime,
               source: dict[str, Any]) -> dict[str, Any]:
    sizes = {"scale_jobs": args.scale_jobs, "scale_nodes": args.scale_nodes,
             "scale_node_jobs": args.scale_node_jobs,
             "scale_ledger_jobs": args.scale_ledger_jobs}
    with testbed.broker_url() as (url, where):
        print(f"bench: broker from {where}; work in {work}", file=sys.stderr)
        machine = {**_machine(url), "broker_source": where}
        load = {"start": _load()}
        figures = scale.measure(url, work, sizes)
        load["end"] = _load()
    return {"timestamp": now.strftime("%Y%m%dT%H%M%SZ"), "date": now.isoformat(timespec="seconds"),
            "machine": machine, "load_average_1_5_15min": load, "source": source,
            "sizes": sizes, "scale": figures, "targets": figures["targets"]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 even when a target is missed (it is a measurement)."""
    args = _arguments(argv)
    work = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # jobs run as nobody and must reach their directories
    try:
        result = run(args, work)
    except BaseException:
        print(f"bench: failed; worker logs kept in {work}", file=sys.stderr)
        raise
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    path = report.write(result, args.results)
    if args.scale:
        print(scale.tables(result["scale"]))
        print("targets:\n" + report.verdicts(result))
        print(f"load average (1/5/15 min): {result['load_average_1_5_15min']}")
        print(f"written to {path}")
        return 0
    print(report.table(result))
    with_ledger = report.ledger_table(result)
    if with_ledger:
        print("\nwith a ledger (claims and events on):\n" + with_ledger)
    floor = report.floor_table(result)
    if floor:
        print("\nthe same work by a minimal dispatcher (bench/minimal.py):\n" + floor)
    if result["per_round"]:
        print(f"\n{result['rounds']} rounds (figures above: medians; ratios: medians of "
              "each round's):\n" + report.rounds_table(result["per_round"]))
    print("targets:\n" + report.verdicts(result))
    print(f"load average (1/5/15 min): {result['load_average_1_5_15min']}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
