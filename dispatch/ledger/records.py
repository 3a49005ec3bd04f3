"""What the ledger answers with: frozen snapshots of jobs and nodes, and the job states."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Any


class LedgerState(enum.StrEnum):
    """A job's state in the ledger: the reply states plus ``Claimed`` (taken, not yet started)."""

    IDLE = "Idle"
    CLAIMED = "Claimed"
    RUNNING = "Running"
    HELD = "Held"
    REMOVED = "Removed"
    EXITED = "Exited"
    REJECTED = "Rejected"

    @property
    def is_final(self) -> bool:
        """Tell whether the job is over: nothing can change its state any more."""
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        """Tell whether a node holds the job (claimed or running)."""
        return self in (LedgerState.CLAIMED, LedgerState.RUNNING)

    @property
    def status(self) -> int:
        """Return HTCondor's numeric ``JobStatus``."""
        return _STATUS[self]


FINAL_STATES = frozenset({LedgerState.REMOVED, LedgerState.EXITED, LedgerState.REJECTED})
_STATUS = {LedgerState.IDLE: 1, LedgerState.CLAIMED: 2, LedgerState.RUNNING: 2,
           LedgerState.REMOVED: 3, LedgerState.EXITED: 4, LedgerState.HELD: 5,
           LedgerState.REJECTED: 4}


@dataclass(frozen=True)
class NodeRecord:
    """An execute node as the ledger last heard of it.

    ``online`` is true while the node has not said it went offline and its last
    heartbeat is younger than three heartbeat intervals. Times are aware UTC.
    """

    name: str
    pools: tuple[str, ...]
    machine: dict[str, Any]
    slots_total: int
    slots_free: int
    running: tuple[str, ...]
    draining: bool
    online: bool
    last_heartbeat_at: datetime.datetime | None
    last_job_at: datetime.datetime | None
    started_at: datetime.datetime | None
    jobs_done: int
    memory_free_mb: int | None = None
    waiting: int = 0
    interval_s: float = 5.0
    offline_reason: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """One job as the ledger knows it; ``attributes`` are those the job chirped."""

    job_id: str
    owner: str | None
    pool: str
    state: LedgerState
    attempt: int
    max_attempts: int
    priority: int = 0
    reason: str | None = None
    control_op: str | None = None
    submitted_at: datetime.datetime | None = None
    started_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    host: str | None = None
    exit_code: int | None = None
    exit_by_signal: bool | None = None
    exit_signal: int | None = None
    duration_s: float | None = None
    result_bytes: int | None = None
    command: str | None = None
    arguments: tuple[str, ...] = ()
    cpus: int = 1
    memory_mb: int = 0
    disk_mb: int = 0
    requirements: str | None = None
    job_name: str | None = None
    array_id: str | None = None
    array_index: int | None = None
    notify_user: str | None = None
    notify_url: str | None = None
    notification: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryEntry:
    """One state change of a job."""

    job_id: str
    attempt: int
    event: str
    state: str
    at: datetime.datetime
    node: str | None
    detail: str | None


def job_record(row: Any, attributes: dict[str, str] | None = None) -> JobRecord:
    """Return a snapshot of a :class:`~dispatch.ledger.models.JobRow`."""
    return JobRecord(
        job_id=row.job_id, owner=row.owner, pool=row.pool, state=LedgerState(row.state),
        attempt=row.attempt, max_attempts=row.max_attempts, priority=row.priority,
        reason=row.reason, control_op=row.control_op, submitted_at=row.submitted_at,
        started_at=row.started_at, finished_at=row.finished_at, host=row.host,
        exit_code=row.exit_code, exit_by_signal=row.exit_by_signal,
        exit_signal=row.exit_signal, duration_s=row.duration_s,
        result_bytes=row.result_bytes, command=row.command,
        arguments=tuple(row.arguments or ()), cpus=row.cpus, memory_mb=row.memory_mb,
        disk_mb=row.disk_mb, requirements=row.requirements, job_name=row.job_name,
        array_id=row.array_id, array_index=row.array_index, notify_user=row.notify_user,
        notify_url=row.notify_url, notification=row.notification,
        attributes=dict(attributes or {}),
    )


def node_record(row: Any, now: datetime.datetime) -> NodeRecord:
    """Return a snapshot of a :class:`~dispatch.ledger.models.NodeRow` as seen at ``now``."""
    last = row.last_heartbeat_at
    fresh = last is not None and (now - last).total_seconds() < 3 * (row.interval_s or 5.0)
    gone = row.offline_at is not None and (last is None or row.offline_at >= last)
    return NodeRecord(
        name=row.name, pools=tuple(row.pools or ()), machine=dict(row.machine or {}),
        slots_total=row.slots_total, slots_free=row.slots_free,
        running=tuple(str(r.get("job_id")) for r in row.running or () if isinstance(r, dict)),
        draining=bool(row.draining), online=fresh and not gone, last_heartbeat_at=last,
        last_job_at=row.last_job_at, started_at=row.started_at, jobs_done=row.jobs_done,
        memory_free_mb=row.memory_free_mb, waiting=row.waiting, interval_s=row.interval_s,
        offline_reason=row.offline_reason if gone else None,
    )
