"""``python -m bench.ledger_ab``: latency without and with a ledger, alternating, same broker.

On a shared machine the load moves by more within minutes than a ledger moves the
latency, and the main run always measures the ledger second. This runs short latency
phases in turns (without, with, with, without, ...), each on a fresh worker (and, for
"with", a fresh ``dispatch ledger`` on one private PostgreSQL), and prints each pair and
the median ratio. Options: ``--pairs`` (default 4), ``--jobs`` a phase (default 300).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import dispatch_side, postgres, stats, testbed


def _latency(url: str, work: Path, name: str, jobs: int, db_url: str | None) -> dict[str, Any]:
    def body(client: Any, pool: str, *_: Any) -> list[float]:
        return dispatch_side.run_latency(client, pool, jobs, 20)

    return stats.latency_figures(dispatch_side.phase(url, work, name, 2, body, ledger_db=db_url))


def main(argv: list[str] | None = None) -> int:
    """Run the pairs and print them; exit 0 (a measurement, no target)."""
    parser = argparse.ArgumentParser(prog="bench.ledger_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir="/var/tmp"))
    work.chmod(0o755)
    testbed.snapshot(work)
    ratios = []
    try:
        with testbed.broker_url() as (url, _), postgres.server() as server:
            db_url = postgres.create_database(server.url)
            for pair in range(args.pairs):
                order = (False, True) if pair % 2 == 0 else (True, False)
                got = {with_ledger: _latency(url, work, f"ab{pair}-{int(with_ledger)}",
                                             args.jobs, db_url if with_ledger else None)
                       for with_ledger in order}
                ratio = got[True]["p50_ms"] / got[False]["p50_ms"]
                ratios.append(ratio)
                print(f"pair {pair + 1} ({'none first' if pair % 2 == 0 else 'ledger first'}):"
                      f" p50 {got[False]['p50_ms']} -> {got[True]['p50_ms']} ms ({ratio:.2f}x),"
                      f" p99 {got[False]['p99_ms']} -> {got[True]['p99_ms']} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"median p50 ratio, ledger/none: {statistics.median(ratios):.2f}x", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
