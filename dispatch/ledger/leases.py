"""Leases: a job whose node stopped renewing its claim goes out again, or on hold.

A node's claim gives a job a lease of ``lease_s`` seconds; its running event and
every heartbeat that lists the job renew it (times are the node's ``at``, so nodes'
clocks must agree within a small part of a lease). :func:`expire_leases` is a plain
function so that a periodic task (the Celery beat of the cloud plane) can call it.
"""

from __future__ import annotations

import datetime
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch.job import JobState
from dispatch.ledger import capture
from dispatch.ledger.models import HistoryRow, JobRow, NodeRow
from dispatch.ledger.publisher import Publisher
from dispatch.ledger.records import LedgerState
from dispatch.ledger.store import Ledger
from dispatch.ledger.times import end_lease

log = logging.getLogger(__name__)

LEDGER_NODE = "ledger"
_ACTIVE = [LedgerState.CLAIMED.value, LedgerState.RUNNING.value]


def expire_leases(ledger: Ledger, publisher: Publisher,
                  now: datetime.datetime) -> list[str]:
    """Send out again, or hold after ``MaxAttempts``, every job whose lease expired by ``now``.

    A job on a node that said it went offline expires at once. Commits only once the
    broker confirmed what was published. Returns the ids of the jobs handled.
    """
    with ledger.transaction() as session:
        rows = _expired(session, now)
        for row in rows:
            reason = f"lease expired on {row.host or 'an unknown node'}"
            if row.request is None:
                hold(session, publisher, row, now, f"{reason}; its request was never recorded")
            elif row.attempt >= row.max_attempts:
                hold(session, publisher, row, now,
                     f"{reason} after {row.attempt} attempt(s) (MaxAttempts {row.max_attempts})")
            else:
                send_again(session, publisher, row, now, reason)
        publisher.flush()
        return [row.job_id for row in rows]


def _expired(session: Session, now: datetime.datetime) -> list[JobRow]:
    active = (JobRow.state.in_(_ACTIVE), JobRow.control_op.is_(None))
    query = select(JobRow).where(*active, JobRow.lease_expires_at < now)
    found = {row.job_id: row for row in session.scalars(query)}
    gone = (select(JobRow).join(NodeRow, NodeRow.name == JobRow.host)
            .where(*active, NodeRow.offline_at.is_not(None),
                   NodeRow.offline_at >= JobRow.lease_renewed_at))
    for row in session.scalars(gone):
        found.setdefault(row.job_id, row)
    return sorted(found.values(), key=lambda r: r.job_id)


def send_again(session: Session, publisher: Publisher, row: JobRow,
               now: datetime.datetime, reason: str) -> None:
    """Publish a job's stored request with the next attempt, and tell its client."""
    if row.request is None:
        raise ValueError(f"job {row.job_id}: no stored request to send")
    request = capture.unpack(row.request)
    attempt = row.attempt + 1
    publisher.send_job(row.pool, request, attempt)
    publisher.reply(request, attempt, JobState.IDLE, reason=reason)
    log.warning("job %s: %s; sent out again as attempt %d", row.job_id, reason, attempt)
    row.attempt, row.state, row.reason, row.host, row.started_at = (
        attempt, LedgerState.IDLE.value, reason, None, None)
    end_lease(row)
    _note(session, row, "job.requeued", now, reason)


def hold(session: Session, publisher: Publisher, row: JobRow, now: datetime.datetime,
         reason: str) -> None:
    """Put a job on hold with ``reason`` and tell its client."""
    if row.request is not None:
        request = capture.unpack(row.request)
        publisher.reply(request, row.attempt, JobState.HELD, reason=reason,
                        hold_reason=reason)
    log.warning("job %s: held: %s", row.job_id, reason)
    row.state, row.reason = LedgerState.HELD.value, reason
    end_lease(row)
    _note(session, row, "job.held", now, reason)


def _note(session: Session, row: JobRow, event: str, now: datetime.datetime,
          reason: str) -> None:
    row.updated_at = now
    session.add(HistoryRow(event_id=None, job_id=row.job_id, attempt=row.attempt, event=event,
                           state=row.state, at=now, node=LEDGER_NODE, detail=reason))
