"""CPU time of the processes a phase runs on, read from ``/proc`` (Linux only).

A throughput phase reads three meters before and after: the broker (the process
listening on the broker's port, when it runs on this machine), the worker (its whole
process tree, with the jobs it ran and reaped) and the submitting process itself.
Their difference over the jobs done says where each job's CPU goes.

Other processes' CPU comes from ``/proc/PID/stat`` in clock ticks (10 ms here), so a
short phase may read a side that did a few milliseconds of work as 0; a phase of
thousands of jobs (the bench's default) is what gives a figure to quote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

_TICKS_S = os.sysconf("SC_CLK_TCK")
_LISTEN = "0A"


@dataclass(frozen=True)
class Reading:
    """CPU seconds so far of the broker (None: not on this machine), worker and client."""

    broker_s: float | None
    worker_s: float
    client_s: float


def per_job_ms(before: Reading, after: Reading, jobs: int) -> dict[str, float | None]:
    """Return the CPU milliseconds per job each side spent between two readings."""
    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) / jobs * 1e3, 3)

    return {"broker": ms(before.broker_s, after.broker_s),
            "worker": ms(before.worker_s, after.worker_s),
            "client": ms(before.client_s, after.client_s)}


class Meter:
    """Reads the CPU time of a broker, a worker process tree and this process."""

    def __init__(self, broker_url: str, worker_pids: int | list[int]) -> None:
        port = urlsplit(broker_url).port or 5672
        self.broker_pid = listener_pid(port)
        self.worker_pids = [worker_pids] if isinstance(worker_pids, int) else worker_pids

    def read(self) -> Reading:
        """Return the CPU seconds each has used so far (the workers' trees summed)."""
        broker = None if self.broker_pid is None else _cpu_s(self.broker_pid, children=False)
        workers = sum(tree_cpu_s(pid) for pid in self.worker_pids)
        # This process's own clock counts nanoseconds; /proc counts 10 ms ticks.
        return Reading(broker, workers, time.process_time())


def tree_cpu_s(root: int) -> float:
    """Return the CPU seconds of ``root`` and its live descendants, with their reaped children.

    A job the worker ran and reaped counts in the worker's children's time; a Celery
    pool process is still alive and counts through its own line.
    """
    parents = dict(_parents())
    total = 0.0
    stack = [root]
    while stack:
        pid = stack.pop()
        total += _cpu_s(pid, children=True) or 0.0
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


def listener_pid(port: int) -> int | None:
    """Return the pid of the process listening on TCP ``port`` here, or None."""
    inodes = set(_listening_inodes(port))
    if not inodes:
        return None
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def _listening_inodes(port: int) -> Iterator[str]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)  # the header line
                for line in fh:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                        yield inode
        except OSError:
            continue


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 0


def _parents() -> Iterator[tuple[int, int]]:
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is not None:
            yield pid, int(fields[1])


def _cpu_s(pid: int, *, children: bool) -> float | None:
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime are fields 14-17 of /proc/PID/stat (11-14 here).
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS_S
