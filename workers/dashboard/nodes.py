"""What the Flower feed knows about execute nodes and their jobs, built from events.

Pure: no I/O and no kombu. Times are wall-clock seconds (``time.time()``), passed in.
A node is alive from a fresh heartbeat until it says it went offline or its
heartbeats stop for :data:`MISSED_BEATS` intervals.
"""

from __future__ import annotations

import collections
import datetime
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Heartbeat intervals without a heartbeat after which a node counts as gone.
MISSED_BEATS = 3
#: A heartbeat older than this many intervals when it arrives (a backlog) is not news.
STALE_FLOOR_S = 30.0
#: Windows of the 1, 5 and 15 minute load averages of busy slots.
LOAD_WINDOWS_S = (60.0, 300.0, 900.0)
#: Jobs whose start is known but whose end is not yet, at most (oldest forgotten first).
MAX_TRACKED_JOBS = 10_000
#: Job ids remembered per node as removed or held (``inspect revoked``).
MAX_REVOKED = 1_000
#: A node gone this long is forgotten (cloud nodes come and go under new names).
FORGET_AFTER_S = 24 * 3600.0


def epoch(iso: Any, default: float) -> float:
    """Return an ISO-8601 time as seconds since the epoch, or ``default`` when unreadable."""
    if not isinstance(iso, str):
        return default
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return default
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass
class JobView:
    """A job as the dashboard shows it: its name, arguments and where it runs."""

    job_id: str
    name: str
    args: str
    kwargs: str
    pool: str
    attempt: int
    node: str
    received_at: float = 0.0
    started_at: float | None = None


@dataclass
class NodeView:
    """One execute node: its latest heartbeat and what the feed counted about it."""

    name: str
    heartbeat: dict[str, Any] = field(default_factory=dict)
    alive: bool = False
    last_beat_at: float = 0.0  # when the feed received the last fresh heartbeat
    beat_at: float = 0.0  # the heartbeat's own time
    seen_at: float = 0.0  # when the feed last received any event from it
    load: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    totals: collections.Counter[str] = field(default_factory=collections.Counter)
    revoked: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_REVOKED))

    @property
    def interval_s(self) -> float:
        """Return the node's heartbeat interval (10 s when it never said)."""
        value = self.heartbeat.get("interval_s")
        return float(value) if isinstance(value, int | float) and value > 0 else 10.0

    @property
    def busy_slots(self) -> int:
        """Return how many slots run jobs, by the last heartbeat."""
        total = int(self.heartbeat.get("slots_total") or 0)
        return max(0, total - int(self.heartbeat.get("slots_free") or 0))

    def fresh(self, at: float, now: float) -> bool:
        """Tell whether a heartbeat sent at ``at`` is still news at ``now``."""
        return now - at <= max(MISSED_BEATS * self.interval_s, STALE_FLOOR_S)

    def expired(self, now: float) -> bool:
        """Tell whether an alive node has missed too many heartbeats."""
        return self.alive and now - self.last_beat_at > MISSED_BEATS * self.interval_s

    def absorb(self, body: Mapping[str, Any], now: float) -> bool:
        """Take a heartbeat; return True when it is fresh (the node is alive)."""
        at = epoch(body.get("at"), now)
        if at < self.beat_at:
            return self.alive  # an older heartbeat than one already seen
        previous = self.beat_at
        self.heartbeat, self.beat_at = dict(body), at
        self._average_load(at - previous if previous else None)
        if not self.fresh(at, now):
            return False
        self.alive, self.last_beat_at = True, now
        return True

    def _average_load(self, elapsed_s: float | None) -> None:
        busy = float(self.busy_slots)
        if elapsed_s is None:
            self.load = [busy, busy, busy]
            return
        for i, window in enumerate(LOAD_WINDOWS_S):
            keep = math.exp(-max(0.0, elapsed_s) / window)
            self.load[i] = round(self.load[i] * keep + busy * (1.0 - keep), 2)


class NodeBook:
    """Every node seen, and the jobs they run."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.jobs: collections.OrderedDict[str, JobView] = collections.OrderedDict()

    def node(self, name: str) -> NodeView:
        """Return the view of node ``name``, made on first sight."""
        view = self.nodes.get(name)
        if view is None:
            view = self.nodes[name] = NodeView(name)
        return view

    def seen(self, name: str, now: float) -> NodeView:
        """Return the view of node ``name``, noting that it was just heard from."""
        view = self.node(name)
        view.seen_at = now
        return view

    def alive(self) -> Iterator[NodeView]:
        """Yield the nodes believed alive."""
        return (n for n in self.nodes.values() if n.alive)

    def prune(self, now: float) -> list[str]:
        """Forget nodes gone for :data:`FORGET_AFTER_S`; return their names."""
        gone = [n.name for n in self.nodes.values()
                if not n.alive and now - n.seen_at > FORGET_AFTER_S]
        for name in gone:
            del self.nodes[name]
        return gone

    def track(self, job: JobView) -> None:
        """Remember a claimed job until its end."""
        self.jobs.pop(job.job_id, None)
        self.jobs[job.job_id] = job
        while len(self.jobs) > MAX_TRACKED_JOBS:
            self.jobs.popitem(last=False)

    def job(self, job_id: str) -> JobView | None:
        """Return a tracked job, if known."""
        return self.jobs.get(job_id)

    def finish(self, job_id: str) -> JobView | None:
        """Forget a job that ended; return what was known of it."""
        return self.jobs.pop(job_id, None)

    def running_on(self, node: str) -> list[JobView]:
        """Return the tracked jobs the node's last heartbeat lists as running."""
        listed = self.node(node).heartbeat.get("running") or []
        ids = [r.get("job_id") for r in listed if isinstance(r, Mapping)]
        return [j for j in (self.jobs.get(str(i)) for i in ids) if j is not None]
