"""rm, hold and release: checked against the job's owner, stored, then broadcast to nodes.

A request ``{op, job_ids, reason}`` comes with the sender's broker-validated ``user_id``.
Only the job's owner (the ``user_id`` it was submitted with) or an admin may act on a
job; each refusal is answered and logged. What is accepted is kept in the ledger (the
job's ``control_op`` and a ``control_requests`` row) before it is broadcast, so a
node that missed the broadcast is told again when it claims or starts the job.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch import schema
from dispatch.errors import InvalidMessageError
from dispatch.events import ControlOp
from dispatch.job import JobState
from dispatch.ledger import capture
from dispatch.ledger.leases import LEDGER_NODE, send_again
from dispatch.ledger.models import ControlRow, HistoryRow, JobRow
from dispatch.ledger.publisher import Publisher
from dispatch.ledger.records import LedgerState
from dispatch.ledger.store import Ledger
from dispatch.ledger.times import end_lease
from dispatch.ledger.transitions import Rebroadcast

log = logging.getLogger(__name__)

USER_OPS = (ControlOp.REMOVE, ControlOp.HOLD, ControlOp.RELEASE)


@dataclass(frozen=True)
class Outcome:
    """What became of one job of a request."""

    job_id: str
    ok: bool
    state: str | None
    error: str | None = None


@dataclass(frozen=True)
class Request:
    """A user's control request, validated."""

    op: ControlOp
    job_ids: tuple[str, ...]
    reason: str | None
    user: str


def parse_request(body: Mapping[str, Any], user: str | None) -> Request:
    """Return a validated request; raise InvalidMessageError naming the field at fault."""
    schema.validate(schema.CONTROL, dict(body), InvalidMessageError)
    op = ControlOp(body["op"])
    if op not in USER_OPS:
        raise InvalidMessageError(f"must be one of {', '.join(USER_OPS)}", field="op")
    if not user:
        raise InvalidMessageError("is required: set it to your broker user (the broker checks it)",
                                  field="user_id")
    return Request(op, tuple(dict.fromkeys(body["job_ids"])), body.get("reason"), user)


def handle(ledger: Ledger, publisher: Publisher, request: Request, *,
           admins: Iterable[str], now: datetime.datetime) -> list[Outcome]:
    """Apply one request job by job, store and broadcast what was accepted.

    Commits only once the broker confirmed every publish.
    """
    admin = request.user in set(admins)
    outcomes: list[Outcome] = []
    with ledger.transaction() as session:
        rows = {r.job_id: r for r in session.scalars(
            select(JobRow).where(JobRow.job_id.in_(request.job_ids)))}
        for job_id in request.job_ids:
            row = rows.get(job_id)
            if row is None:
                outcomes.append(Outcome(job_id, False, None, "no such job in the ledger"))
            elif not admin and row.owner != request.user:
                log.warning("job %s: %s by %s refused: owned by %s", job_id,
                            request.op.value, request.user, row.owner)
                outcomes.append(Outcome(job_id, False, row.state, (
                    f"permission denied: {request.user} may not {request.op.value} a job "
                    f"owned by {row.owner or 'an unknown user'}")))
            else:
                outcomes.append(_OPS[request.op](session, publisher, row, request, now))
        accepted = [o.job_id for o in outcomes if o.ok]
        if accepted:
            session.add(ControlRow(op=request.op.value, job_ids=accepted, reason=request.reason,
                                   by=request.user, at=now))
            body = control_body(request.op, accepted, request.reason, request.user, now)
            if request.op is ControlOp.RELEASE:
                body["attempts"] = {j: rows[j].attempt for j in accepted}
            publisher.broadcast(body)
        publisher.flush()
    return outcomes


def answer(op: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """Return the answer body: ``{op, ok, results: [{job_id, ok, state, error}]}``."""
    return {"op": op, "ok": bool(outcomes) and all(o.ok for o in outcomes),
            "results": [asdict(o) for o in outcomes]}


def control_body(op: ControlOp, job_ids: list[str], reason: str | None, by: str | None,
                 now: datetime.datetime) -> dict[str, Any]:
    """Return the body of a control broadcast."""
    return {"op": op.value, "job_ids": job_ids, "reason": reason, "by": by or LEDGER_NODE,
            "at": now.isoformat()}


def rebroadcast(publisher: Publisher, wanted: Iterable[Rebroadcast],
                now: datetime.datetime) -> None:
    """Broadcast again the pending operations of jobs a node claimed or started anyway."""
    groups: dict[tuple[str, str | None, str | None], list[str]] = {}
    for item in wanted:
        groups.setdefault((item.op, item.reason, item.by), []).append(item.job_id)
    for (op, reason, by), job_ids in groups.items():
        log.info("job %s: %s sent again (%d job(s))", job_ids[0], op, len(job_ids))
        publisher.broadcast(control_body(ControlOp(op), sorted(set(job_ids)), reason, by, now))


# -- the operations ----------------------------------------------------------------------

def _remove(session: Session, publisher: Publisher, row: JobRow, req: Request,
            now: datetime.datetime) -> Outcome:
    state = LedgerState(row.state)
    if state.is_final:
        return Outcome(row.job_id, False, row.state, f"job is already {row.state}")
    row.control_op, row.control_by = ControlOp.REMOVE.value, req.user
    row.reason = req.reason or f"removed by {req.user}"
    if not state.is_active:  # queued or held: over now; a node that gets it drops it
        row.state, row.finished_at = LedgerState.REMOVED.value, now
        end_lease(row)
        _reply(publisher, row, JobState.REMOVED, reason=row.reason)
    _note(session, row, "job.removed", now, req)
    return Outcome(row.job_id, True, row.state)


def _hold(session: Session, publisher: Publisher, row: JobRow, req: Request,
          now: datetime.datetime) -> Outcome:
    state = LedgerState(row.state)
    if state.is_final or state is LedgerState.HELD:
        return Outcome(row.job_id, False, row.state, f"job is already {row.state}")
    row.control_op, row.control_by = ControlOp.HOLD.value, req.user
    row.reason = req.reason or f"held by {req.user}"
    if not state.is_active:
        row.state = LedgerState.HELD.value
        _reply(publisher, row, JobState.HELD, reason=row.reason, hold_reason=row.reason)
    _note(session, row, "job.held", now, req)
    return Outcome(row.job_id, True, row.state)


def _release(session: Session, publisher: Publisher, row: JobRow, req: Request,
             now: datetime.datetime) -> Outcome:
    if row.state != LedgerState.HELD.value:
        return Outcome(row.job_id, False, row.state, f"job is {row.state}, not Held")
    if row.request is None:
        return Outcome(row.job_id, False, row.state, "its request was never recorded")
    row.control_op = row.control_by = None
    send_again(session, publisher, row, now, req.reason or f"released by {req.user}")
    return Outcome(row.job_id, True, row.state)


def _reply(publisher: Publisher, row: JobRow, state: JobState, **fields: Any) -> None:
    if row.request is not None:
        publisher.reply(capture.unpack(row.request), row.attempt, state, **fields)


def _note(session: Session, row: JobRow, event: str, now: datetime.datetime,
          req: Request) -> None:
    row.updated_at = now
    session.add(HistoryRow(event_id=None, job_id=row.job_id, attempt=row.attempt, event=event,
                           state=row.state, at=now, node=LEDGER_NODE,
                           detail=f"{req.op.value} by {req.user}: {row.reason}"))


_Op = Callable[[Session, Publisher, JobRow, Request, datetime.datetime], Outcome]
_OPS: dict[ControlOp, _Op] = {ControlOp.REMOVE: _remove, ControlOp.HOLD: _hold,
                              ControlOp.RELEASE: _release}

__all__ = ["Outcome", "Request", "answer", "handle", "parse_request", "rebroadcast"]
