"""Counting for the fault suite: what was submitted, confirmed, finished, run.

Every job of the fault suite appends one line (``job-id attempt``) to a counter file
outside its working directory as it starts, so extra executions are counted from
what really ran, not from what the replies say. Finals are counted from the replies
the client hands out. With ``DISPATCH_FAULT_FIGURES=path`` each scenario run appends
its figures to that file as one JSON line.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch.client import Client
from dispatch.job import JobSpec, JobUpdate

FIGURES_ENV = "DISPATCH_FAULT_FIGURES"
#: How long, after the last expected final, a duplicate is still looked for.
QUIET_S = 2.0


def counting_job(count_file: Path, pool: str, *, gate: Path | None = None,
                 sleep_s: float = 0.0, pad_bytes: int = 0) -> JobSpec:
    """A job that notes its start in ``count_file``, then waits for ``gate`` or sleeps."""
    script = 'echo "$DISPATCH_JOB_ID $DISPATCH_ATTEMPT" >> "$COUNT_FILE"'
    if gate is not None:
        script += f'; while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done'
    if sleep_s:
        script += f"; sleep {sleep_s}"
    env = {"COUNT_FILE": str(count_file)}
    if pad_bytes:
        env["PAD"] = "x" * pad_bytes
    return JobSpec("/bin/sh", ("-c", script), environment=env, pool=pool)


def executions(count_file: Path) -> collections.Counter[str]:
    """Return how many times each job started, from its counter file."""
    if not count_file.exists():
        return collections.Counter()
    lines = count_file.read_text().split("\n")
    return collections.Counter(line.split()[0] for line in lines if line.strip())


@dataclass
class Tally:
    """One scenario run's figures."""

    scenario: str
    run: int = 1
    submitted: int = 0
    confirmed: set[str] = field(default_factory=set)
    finals: collections.Counter[str] = field(default_factory=collections.Counter)
    started: collections.Counter[str] = field(default_factory=collections.Counter)
    guarantee: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where each final came from: (host, attempt) per job, for the report of a duplicate.
    origins: dict[str, list[tuple[str | None, int]]] = field(default_factory=dict)

    def note(self, update: JobUpdate) -> None:
        """Count a reply if it is a final one."""
        if update.is_final:
            self.finals[update.job_id] += 1
            self.origins.setdefault(update.job_id, []).append((update.host, update.attempt))

    @property
    def lost(self) -> int:
        """Confirmed jobs with no final result."""
        return len(self.confirmed - set(self.finals))

    @property
    def duplicates(self) -> int:
        """Final results beyond the first of each job."""
        return sum(n - 1 for n in self.finals.values() if n > 1)

    @property
    def extra_executions(self) -> int:
        """Starts beyond the first of each job."""
        return sum(n - 1 for n in self.started.values() if n > 1)

    def figures(self) -> dict[str, Any]:
        """Return the run's figures as one JSON-ready dict."""
        return {"scenario": self.scenario, "run": self.run, "submitted": self.submitted,
                "confirmed": len(self.confirmed), "finals": sum(self.finals.values()),
                "jobs_with_final": len(set(self.finals) & self.confirmed),
                "lost": self.lost, "duplicates": self.duplicates,
                "executions": sum(self.started.values()),
                "extra_executions": self.extra_executions,
                "never_started": len(self.confirmed - set(self.started)),
                "unknown_finals": len(set(self.finals) - self.confirmed),
                "guarantee": self.guarantee, **self.extra,
                **({"duplicated": {j: self.origins.get(j) for j, n in self.finals.items()
                                   if n > 1}} if self.duplicates else {})}

    def record(self) -> dict[str, Any]:
        """Write the figures where ``DISPATCH_FAULT_FIGURES`` says (if set); return them."""
        figures = self.figures()
        path = os.environ.get(FIGURES_ENV)
        if path:
            with Path(path).open("a") as out:
                out.write(json.dumps(figures, sort_keys=True) + "\n")
        return figures


def collect_finals(client: Client, tally: Tally, job_ids: Iterable[str], *,
                   timeout_s: float, on_final: Any = None) -> None:
    """Take replies for ``job_ids`` until each has a final, then look for duplicates.

    ``on_final(count)`` is called after each final (a scenario's fault trigger).
    Raises TimeoutError naming the jobs still missing after ``timeout_s``.
    """
    ids = set(job_ids)
    deadline = time.monotonic() + timeout_s
    while not ids <= set(tally.finals):
        left = deadline - time.monotonic()
        update = client.next_update(ids, max(0.0, left)) if left > 0 else None
        if update is None:
            missing = sorted(ids - set(tally.finals))
            raise TimeoutError(f"{len(missing)} job(s) with no final after {timeout_s}s: "
                               f"{missing[:5]}")
        tally.note(update)
        if update.is_final and on_final is not None:
            on_final(len(set(tally.finals)))
    # A second final, should there be one, comes soon after the first: keep listening.
    while (update := client.next_update(ids, QUIET_S)) is not None:
        tally.note(update)


def rss_kib(pid: int) -> int:
    """Return a process's resident set size in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")
