"""How each event changes the ledger, applied to many events in one transaction.

Rules that make the ledger safe under redelivery and late messages:

- a job event is applied once: its id (``<job_id>/<attempt>/<event>@<node>``) is kept
  in the history table, and an id seen before is skipped (attribute events excepted:
  setting an attribute twice is harmless);
- an event whose attempt is lower than the job's current attempt is stale and
  changes nothing, so a job has exactly one final result;
- a final state (Exited, Removed, Rejected) never changes again;
- a claim or start of a job with a pending remove or hold changes nothing and asks
  for the control message to be broadcast again (the node missed it).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch import events
from dispatch.events import Event
from dispatch.ledger import capture
from dispatch.ledger.heartbeats import update_node
from dispatch.ledger.models import AttributeRow, HistoryRow, JobRow, NodeRow
from dispatch.ledger.records import FINAL_STATES, LedgerState
from dispatch.ledger.times import end_lease, maybe_time, parse_time, renew_lease

log = logging.getLogger(__name__)

_CHUNK = 500


@dataclass(frozen=True)
class Rebroadcast:
    """A control operation nodes must hear again for one job."""

    op: str
    job_id: str
    reason: str | None
    by: str | None


@dataclass(frozen=True)
class StateChange:
    """A job that asked for notices entered a new state."""

    job_id: str
    state: LedgerState


@dataclass
class Effects:
    """What the service must do once the batch is committed."""

    rebroadcasts: list[Rebroadcast] = field(default_factory=list)
    changes: list[StateChange] = field(default_factory=list)




def dedupe_key(body: Mapping[str, Any]) -> str:
    """Return the key that makes a job event apply once: its event id and its node.

    The node is part of it because the same attempt may be claimed twice: when a node
    dies before it acks the job message, the broker hands the message to another node,
    whose claim must move the job (and its lease) there.
    """
    return f"{events.event_id(body)}@{body.get('node')}"


class Applier:
    """Applies events and submissions inside one session; the caller commits."""

    def __init__(self, session: Session,
                 forgotten_before: datetime.datetime | None = None) -> None:
        self.session = session
        #: Finished jobs up to here were purged: a late event for one must not revive it.
        self.forgotten_before = forgotten_before
        self.effects = Effects()
        self._jobs: dict[str, JobRow | None] = {}
        self._seen: set[str] = set()
        self._nodes: dict[str, NodeRow] = {}

    # -- loading --------------------------------------------------------------------

    def prefetch(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        """Load every job and event id the bodies mention, a few queries in all."""
        ids: set[str] = set()
        event_ids: set[str] = set()
        for body in bodies:
            if "job_id" in body:
                ids.add(str(body["job_id"]))
                event_ids.add(dedupe_key(body))
            for entry in body.get("running") or ():
                if isinstance(entry, Mapping) and "job_id" in entry:
                    ids.add(str(entry["job_id"]))
        self.load_jobs(ids)
        for chunk in _chunks(event_ids - self._seen):
            query = select(HistoryRow.event_id).where(HistoryRow.event_id.in_(chunk))
            self._seen.update(e for e in self.session.scalars(query) if e)

    def load_jobs(self, ids: Iterable[str]) -> None:
        """Load the rows of ``ids`` not yet loaded."""
        missing = {i for i in ids if i not in self._jobs}
        for chunk in _chunks(missing):
            for row in self.session.scalars(select(JobRow).where(JobRow.job_id.in_(chunk))):
                self._jobs[row.job_id] = row
        for job_id in missing:
            self._jobs.setdefault(job_id, None)

    def job(self, job_id: str) -> JobRow | None:
        """Return a job's row, loading it when needed."""
        if job_id not in self._jobs:
            self.load_jobs([job_id])
        return self._jobs[job_id]

    def new_job(self, job_id: str, pool: str, attempt: int) -> JobRow:
        """Add a job first heard of now."""
        row = JobRow(job_id=job_id, pool=pool, state=LedgerState.IDLE.value, attempt=attempt,
                     max_attempts=3, priority=0, cpus=1, memory_mb=0, disk_mb=0)
        self.session.add(row)
        self._jobs[job_id] = row
        return row

    # -- recording ------------------------------------------------------------------

    def record(self, job: JobRow, event: str, at: datetime.datetime, *,
               event_id: str | None, node: str | None = None,
               detail: str | None = None) -> None:
        """Add a history entry for ``job`` in its current state."""
        if event_id is not None:
            self._seen.add(event_id)
        self.session.add(HistoryRow(event_id=event_id, job_id=job.job_id, attempt=job.attempt,
                                    event=event, state=job.state, at=at, node=node,
                                    detail=detail))
        job.updated_at = at

    def set_state(self, job: JobRow, state: LedgerState) -> None:
        """Move ``job`` to ``state``, noting the change for notices."""
        if job.state != state.value:
            job.state = state.value
            if job.notify_user or job.notify_url:
                self.effects.changes.append(StateChange(job.job_id, state))

    def describe(self, job: JobRow, request: Mapping[str, Any] | None) -> None:
        """Fill the job's request columns from a captured request, once."""
        if not isinstance(request, Mapping) or job.request is not None:
            return
        props = request.get("properties") or {}
        raw = request.get("headers") or {}
        if not isinstance(props, Mapping) or not isinstance(raw, Mapping):
            return
        for column, value in capture.job_fields(props, raw).items():
            if column == "owner" and job.owner:
                continue
            setattr(job, column, value)
        job.request = capture.pack(request)

    # -- events ---------------------------------------------------------------------

    def apply(self, body: Mapping[str, Any]) -> bool:
        """Apply one event; return False when it was seen before, stale or too late."""
        event = Event(body["event"])
        at = parse_time(body["at"])
        if event is Event.HEARTBEAT:
            return self._heartbeat(body, at)
        if event is Event.OFFLINE:
            return self._offline(body, at)
        return self._job_event(event, body, at)

    def _job_event(self, event: Event, body: Mapping[str, Any], at: datetime.datetime) -> bool:
        eid = dedupe_key(body)
        if event not in (Event.ATTRIBUTE, Event.GATHERING) and eid in self._seen:
            return False
        job_id, attempt = str(body["job_id"]), int(body["attempt"])
        job = self.job(job_id)
        if job is None and self.forgotten_before is not None and at < self.forgotten_before:
            log.info("job %s: %s from before the purge horizon for a job not in the ledger; "
                     "ignored", job_id, event.value)
            return False
        job = job or self.new_job(job_id, str(body["pool"]), attempt)
        if attempt < job.attempt:
            log.info("job %s: ignoring %s of stale attempt %d (now %d)", job_id, event.value,
                     attempt, job.attempt)
            return False
        state = LedgerState(job.state)
        if state in FINAL_STATES or (job.control_op and event in _STARTS):
            if job.control_op and event in _STARTS:
                self.effects.rebroadcasts.append(
                    Rebroadcast(job.control_op, job_id, job.reason, job.control_by))
            log.info("job %s: %s after it was %s; ignored", job_id, event.value, state.value)
            return False
        job.attempt = attempt
        _HANDLERS[event](self, job, body, at)
        if event not in (Event.ATTRIBUTE, Event.GATHERING):
            self.record(job, event.value, at, event_id=eid, node=body.get("node"),
                        detail=_detail(body))
        if event is Event.CLAIMED and body.get("started_at"):
            # A claim made as the job starts stands for its running event (one message
            # instead of two): applied as one, with its own history entry and event id.
            self._job_event(Event.RUNNING, {**body, "event": Event.RUNNING.value}, at)
        return True

    def _heartbeat(self, body: Mapping[str, Any], at: datetime.datetime) -> bool:
        name = str(body["node"])
        node = self._nodes.get(name) or self.session.get(NodeRow, name)
        if node is None:
            node = NodeRow(name=name, pools=[], machine={}, running=[])
            self.session.add(node)
        self._nodes[name] = node
        if node.last_heartbeat_at is not None and at <= node.last_heartbeat_at:
            return False
        update_node(node, body, at)
        for entry in body.get("running") or ():
            job = self.job(str(entry.get("job_id")))
            if (job is not None and int(entry.get("attempt", 1)) == job.attempt
                    and LedgerState(job.state).is_active):
                renew_lease(job, at)
        return True

    def _offline(self, body: Mapping[str, Any], at: datetime.datetime) -> bool:
        node = self.session.get(NodeRow, str(body["node"]))
        if node is None or (node.offline_at is not None and node.offline_at >= at):
            return False
        node.offline_at = at
        node.offline_reason = str(body.get("reason") or "offline")
        return True


def _detail(body: Mapping[str, Any]) -> str | None:
    for key in ("reason", "exit_code", "name"):
        if body.get(key) is not None:
            return f"{key}={body[key]}" if key != "reason" else str(body[key])
    return None


# -- one handler per job event ----------------------------------------------------------

def _claimed(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    a.describe(job, body.get("request"))
    a.set_state(job, LedgerState.CLAIMED)
    job.host, job.claimed_at = body.get("host"), at
    job.lease_s = float(body.get("lease_s") or 0) or None
    job.lease_renewed_at = None
    renew_lease(job, at)
    job.reason = None


def _running(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    a.set_state(job, LedgerState.RUNNING)
    job.host = body.get("host") or job.host
    job.started_at = maybe_time(body.get("started_at")) or at
    renew_lease(job, at)


def _attribute(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    name, value = str(body.get("name")), str(body.get("value"))
    row = a.session.get(AttributeRow, (job.job_id, name))
    if row is None:
        a.session.add(AttributeRow(job_id=job.job_id, name=name, value=value,
                                   attempt=job.attempt, at=at))
    elif row.at is None or row.at <= at:
        row.value, row.attempt, row.at = value, job.attempt, at


def _gathering(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    """Keep what a multi-node job's head says of its nodes, as attributes explain shows."""
    for name, value in (("NodesHeld", body.get("held")), ("GangStatus", body.get("status"))):
        if value is not None:
            _attribute(a, job, {"name": name, "value": value}, at)


def _finished(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime,
              state: LedgerState) -> None:
    a.set_state(job, state)
    job.finished_at = at
    job.host = body.get("host") or job.host
    if body.get("duration_s") is not None:
        job.duration_s = float(body["duration_s"])
    end_lease(job)


def _exited(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    _finished(a, job, body, at, LedgerState.EXITED)
    job.exit_code = body.get("exit_code")
    job.exit_by_signal = bool(body.get("exit_by_signal"))
    job.exit_signal = body.get("exit_signal")
    job.result_bytes = body.get("result_bytes")
    # Why the node stopped it or found it over its request (out of memory, disk).
    job.reason = body.get("reason") or None


def _removed(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    _finished(a, job, body, at, LedgerState.REMOVED)
    job.reason = body.get("reason") or job.reason
    job.control_by = body.get("by") or job.control_by


def _rejected(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    a.describe(job, body.get("request"))
    _finished(a, job, body, at, LedgerState.REJECTED)
    job.reason = body.get("reason")


def _held(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    a.describe(job, body.get("request"))
    a.set_state(job, LedgerState.HELD)
    job.reason = body.get("reason") or job.reason
    end_lease(job)


def _idle(a: Applier, job: JobRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    a.set_state(job, LedgerState.IDLE)
    job.host, job.started_at = None, None
    end_lease(job)
    job.reason = body.get("reason")


_Handler = Callable[[Applier, JobRow, Mapping[str, Any], datetime.datetime], None]
_HANDLERS: dict[Event, _Handler] = {
    Event.CLAIMED: _claimed, Event.RUNNING: _running, Event.ATTRIBUTE: _attribute,
    Event.EXITED: _exited, Event.REMOVED: _removed, Event.REJECTED: _rejected,
    Event.HELD: _held, Event.RELEASED: _idle, Event.REQUEUED: _idle,
    Event.GATHERING: _gathering,
}
_STARTS = frozenset({Event.CLAIMED, Event.RUNNING})


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch
