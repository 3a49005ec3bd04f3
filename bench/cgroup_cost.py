"""``python -m bench.cgroup_cost``: what a job's cgroups add to starting and ending it.

Times, per job, ``posix_spawn`` of ``/bin/true`` and its reaping, bare and inside job
cgroups (made, limits written, the spawning thread moved in and back, killed, removed),
without and with a memory limit, and the same for a helper process moved in and back
(the root worker's path); last, only what lies on a plain job's latency path (its
cgroups are made ahead, between jobs, and removed after its reply). Needs writable
cgroups (root). Prints medians in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from workers.cgroups import Cgroups, Limits
from workers.spawn import spawn

_NULL = os.open(os.devnull, os.O_RDWR)


def _run_true() -> None:
    proc = spawn(["/bin/true"], cwd=Path("/"), env={}, stdin=_NULL, stdout=_NULL,
                 stderr=_NULL, account=None)
    os.waitpid(proc.pid, 0)


def _timed(jobs: int, one: Callable[[int], float | None]) -> float:
    """Return the median milliseconds of ``one``: its own figure, or its wall time."""
    samples = []
    for i in range(jobs):
        start = time.perf_counter()
        took = one(i)
        samples.append(time.perf_counter() - start if took is None else took)
    return statistics.median(samples) * 1000


def main(argv: list[str] | None = None) -> None:
    """Print the median per-job cost of each way of starting a job."""
    parser = argparse.ArgumentParser(prog="bench.cgroup_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--root", type=Path, default=Path("/sys/fs/cgroup"))
    args = parser.parse_args(argv)
    cgroups = Cgroups.detect(args.root, f"bench-{os.getpid()}")
    helper = subprocess.Popen(["sleep", "1000"])

    def caged(limits: Limits, pid: int | None, *, ahead: bool = False
              ) -> Callable[[int], float | None]:
        def one(i: int) -> float | None:
            job = cgroups.create(f"job{i}", limits)  # ahead: made between jobs, untimed
            start = time.perf_counter()
            with job.holding(pid):
                _run_true()
            job.kill()
            job.reasons()
            took = time.perf_counter() - start
            job.remove()  # after the reply: untimed with ahead
            return took if ahead else None
        return one

    try:
        bare = _timed(args.jobs, lambda _: _run_true())
        rows = [("bare posix_spawn + wait", bare)]
        for label, limits, pid in (
                ("cgroups, this thread moved", Limits(0, 1, 4096), None),
                ("cgroups + memory limit, this thread moved", Limits(512, 1, 4096), None),
                ("cgroups + memory limit, helper moved", Limits(512, 1, 4096), helper.pid)):
            rows.append((label, _timed(args.jobs, caged(limits, pid))))
        rows.append(("latency path only (spare made ahead, rmdir later)",
                     _timed(args.jobs, caged(Limits(0, 1, 4096), None, ahead=True))))
    finally:
        helper.kill()
        helper.wait()
        for h in cgroups.hierarchies:
            os.rmdir(h.node_dir)
    print(f"{cgroups.describe()}; {args.jobs} jobs each, median ms per job")
    for label, ms in rows:
        print(f"{label:52s} {ms:7.3f}  (+{ms - bare:.3f})")


if __name__ == "__main__":
    main()
