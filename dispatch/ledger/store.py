"""The Ledger: one database (SQLite file or PostgreSQL) holding every job and node.

``Ledger.open(url)`` creates the tables on first use. Writers apply events in
batches (:meth:`Ledger.apply_batch`, one transaction each); readers get frozen
snapshots (:class:`~dispatch.ledger.records.JobRecord`, ``NodeRecord``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session, sessionmaker

from dispatch import schema
from dispatch.errors import InvalidMessageError, LedgerError
from dispatch.ledger.models import AttributeRow, Base, HistoryRow, JobRow, NodeRow
from dispatch.ledger.records import (
    HistoryEntry,
    JobRecord,
    LedgerState,
    NodeRecord,
    job_record,
    node_record,
)
from dispatch.ledger.times import parse_time
from dispatch.ledger.transitions import Applier, Effects

log = logging.getLogger(__name__)


def default_url(environ: Mapping[str, str] | None = None) -> str:
    """Return the ledger URL: ``DISPATCH_LEDGER_URL``, else a SQLite file in the data dir."""
    env = os.environ if environ is None else environ
    if env.get("DISPATCH_LEDGER_URL"):
        return env["DISPATCH_LEDGER_URL"]
    data_dir = env.get("DISPATCH_DATA_DIR")
    base = Path(data_dir) if data_dir else Path.home() / ".local" / "share" / "dispatch"
    return f"sqlite:///{base / 'ledger.db'}"


def utcnow() -> datetime.datetime:
    """Return the current time, aware UTC."""
    return datetime.datetime.now(datetime.UTC)


@dataclass
class BatchResult:
    """What one :meth:`Ledger.apply_batch` did: per-event outcome and follow-up work."""

    applied: list[bool] = field(default_factory=list)
    effects: Effects = field(default_factory=Effects)


#: What applying one odd message can raise, besides the database refusing its data.
_DATA_ERRORS = (TypeError, ValueError, KeyError, AttributeError, LookupError, UnicodeError,
                OverflowError, RecursionError, InvalidMessageError)


def is_bad_data(exc: BaseException) -> bool:
    """Tell whether ``exc`` came from what a batch held, not from the database being away.

    A batch that fails so is applied again message by message, and what fails on its
    own is dead-lettered; a database that cannot be reached is waited for instead.
    """
    if isinstance(exc, LedgerError):
        cause = exc.__cause__
        if isinstance(cause, OperationalError | InterfaceError):
            return False
        return isinstance(cause, DataError | IntegrityError | StatementError)
    return isinstance(exc, _DATA_ERRORS)


class Ledger:
    """The job ledger over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        #: The latest purge horizon: events older than it for unknown jobs are ignored.
        self.forgotten_before: datetime.datetime | None = None

    @classmethod
    def open(cls, url: str | None = None) -> Ledger:
        """Open (and create, the first time) the ledger at ``url`` (default :func:`default_url`)."""
        url = url or default_url()
        try:
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            Base.metadata.create_all(engine)
        except (SQLAlchemyError, OSError) as exc:
            raise LedgerError(f"cannot open the ledger at {_safe(url)}: {exc}") from exc
        return cls(engine)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """Yield a session committed at the end of the block (rolled back on error)."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    # -- writing --------------------------------------------------------------------

    def apply(self, body: Mapping[str, Any]) -> bool:
        """Apply one event; return False when it was already seen, stale or too late.

        Raises InvalidMessageError when ``body`` is not an event.
        """
        return self.apply_batch([body]).applied[0]

    def apply_batch(self, bodies: Sequence[Mapping[str, Any]],
                    submissions: Sequence[Mapping[str, Any]] = (), *,
                    checked: bool = False) -> BatchResult:
        """Record ``submissions`` (captured job messages) then apply ``bodies``, in one commit.

        ``checked`` says the caller already ran :func:`check_event` on every body.
        """
        if not checked:
            for body in bodies:
                check_event(body)
        result = BatchResult()
        with self.transaction() as session:
            applier = Applier(session, self.forgotten_before)
            applier.prefetch([*bodies, *({"job_id": s["properties"].get("message_id"),
                                          "event": "job.submitted"} for s in submissions)])
            for request in submissions:
                record_submission(applier, request)
            result.applied = [applier.apply(body) for body in bodies]
            result.effects = applier.effects
        return result

    def purge(self, before: datetime.datetime, *, batch: int = 500) -> int:
        """Forget the jobs that finished before ``before``; return how many went.

        A job goes with its attributes and state changes. Jobs not yet in a final state
        stay however old they are (a held job is kept until it is released or removed).
        Works ``batch`` jobs per transaction, so a large purge never holds the database
        for long. Events that arrive later for a purged job, stamped before ``before``,
        are ignored by this ledger rather than bringing the job back.
        """
        finals = [s.value for s in LedgerState if s.is_final]
        old = select(JobRow.job_id).where(JobRow.state.in_(finals),
                                          JobRow.finished_at < before).limit(batch)
        if self.forgotten_before is None or before > self.forgotten_before:
            self.forgotten_before = before
        removed = 0
        while True:
            with self.transaction() as session:
                ids = list(session.scalars(old))
                if not ids:
                    return removed
                session.execute(delete(HistoryRow).where(HistoryRow.job_id.in_(ids)))
                session.execute(delete(AttributeRow).where(AttributeRow.job_id.in_(ids)))
                session.execute(delete(JobRow).where(JobRow.job_id.in_(ids)))
            removed += len(ids)

    # -- reading --------------------------------------------------------------------

    def nodes(self, now: datetime.datetime | None = None) -> list[NodeRecord]:
        """Return every node ever heard of, by name."""
        now = now or utcnow()
        with self.transaction() as session:
            rows = session.scalars(select(NodeRow).order_by(NodeRow.name))
            return [node_record(row, now) for row in rows]

    def job(self, job_id: str) -> JobRecord | None:
        """Return one job, or None when the ledger never heard of it."""
        with self.transaction() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return None
            return job_record(row, _attributes(session, [job_id]).get(job_id))

    def jobs(self, *, owner: str | None = None, states: Sequence[LedgerState] = (),
             pool: str | None = None, array_id: str | None = None,
             finished: bool | None = None, limit: int | None = None) -> list[JobRecord]:
        """Return jobs matching every filter given, oldest submission first."""
        query = select(JobRow)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if states:
            query = query.where(JobRow.state.in_([s.value for s in states]))
        if pool is not None:
            query = query.where(JobRow.pool == pool)
        if array_id is not None:
            query = query.where(JobRow.array_id == array_id)
        if finished is not None:
            # IN on both sides (never NOT IN): the state index then finds the few waiting
            # jobs among a million finished ones instead of scanning them all.
            query = query.where(JobRow.state.in_([s.value for s in LedgerState
                                                  if s.is_final == finished]))
        order = JobRow.finished_at.desc() if finished else JobRow.submitted_at
        query = query.order_by(order, JobRow.job_id).limit(limit)
        with self.transaction() as session:
            rows = list(session.scalars(query))
            attrs = _attributes(session, [r.job_id for r in rows])
            return [job_record(r, attrs.get(r.job_id)) for r in rows]

    def queued_ahead(self, job: JobRecord) -> int:
        """Return how many idle jobs of ``job``'s pool a node would take before it."""
        first = JobRow.priority > job.priority
        if job.submitted_at is not None:
            first = first | ((JobRow.priority == job.priority)
                             & (JobRow.submitted_at < job.submitted_at))
        query = (select(func.count()).select_from(JobRow)
                 .where(JobRow.pool == job.pool, JobRow.state == LedgerState.IDLE.value,
                        JobRow.job_id != job.job_id, first))
        with self.transaction() as session:
            return int(session.scalar(query) or 0)

    def history(self, job_id: str) -> list[HistoryEntry]:
        """Return the state changes of one job, oldest first."""
        query = select(HistoryRow).where(HistoryRow.job_id == job_id).order_by(HistoryRow.id)
        with self.transaction() as session:
            return [HistoryEntry(r.job_id, r.attempt, r.event, r.state, r.at, r.node, r.detail)
                    for r in session.scalars(query)]


def check_event(body: Mapping[str, Any]) -> None:
    """Raise InvalidMessageError unless ``body`` follows ``schemas/event.schema.json``."""
    if not isinstance(body, Mapping):
        raise InvalidMessageError("must be a map", field="body")
    schema.validate(schema.EVENT, dict(body), InvalidMessageError)
    try:
        parse_time(body["at"])
    except ValueError:
        raise InvalidMessageError("is not an ISO-8601 time", field="at") from None


def record_submission(applier: Applier, request: Mapping[str, Any]) -> bool:
    """Record a job message seen on its way to a pool; False when the job is known already.

    ``request`` is a captured message plus ``pool`` and ``at`` (when the ledger saw it).
    """
    props = request["properties"]
    job_id = str(props.get("message_id") or "")
    if not job_id or applier.job(job_id) is not None:
        return False
    job = applier.new_job(job_id, str(request["pool"]), 1)
    at = parse_time(request["at"]) if request.get("at") else utcnow()
    job.submitted_at = at
    applier.describe(job, {k: request[k] for k in ("properties", "headers", "body")})
    applier.record(job, "job.submitted", at, event_id=f"{job_id}/submitted")
    return True


def _attributes(session: Session, job_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(job_ids), 500):
        query = select(AttributeRow).where(AttributeRow.job_id.in_(job_ids[i:i + 500]))
        for row in session.scalars(query):
            out.setdefault(row.job_id, {})[row.name] = row.value
    return out


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _safe(url: str) -> str:
    """Return ``url`` without its password."""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        creds, _, rest = tail.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{head}{sep}{user}:***@{rest}"
    return url


__all__ = ["BatchResult", "JobRecord", "Ledger", "LedgerState", "NodeRecord", "default_url"]
