"""The ledger's tables (SQLAlchemy 2.0), the same on SQLite and PostgreSQL.

Times are stored as naive UTC and read back as aware UTC datetimes, so both
databases behave alike. A request is kept as msgpack bytes (properties, raw headers
and body, as :func:`dispatch.events.capture_request` made it) so the ledger can
publish the job again after a lease expires or a release.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, LargeBinary, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """An aware UTC datetime, stored as naive UTC on every database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None,
                           dialect: Dialect) -> datetime.datetime | None:
        """Store ``value`` as naive UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value
        return value.astimezone(datetime.UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime.datetime | None,
                             dialect: Dialect) -> datetime.datetime | None:
        """Read a stored value back as aware UTC."""
        return None if value is None else value.replace(tzinfo=datetime.UTC)


class Base(DeclarativeBase):
    """The ledger's declarative base."""

    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        datetime.datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        str: String(255),
        bytes: LargeBinary(),
    }


class JobRow(Base):
    """One job: what was asked, where it is, and how it ended."""

    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str | None] = mapped_column(index=True)
    pool: Mapped[str] = mapped_column(String(128), index=True)
    priority: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempt: Mapped[int] = mapped_column(default=1)
    max_attempts: Mapped[int] = mapped_column(default=3)
    control_op: Mapped[str | None] = mapped_column(String(16))
    control_by: Mapped[str | None]
    reason: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[datetime.datetime | None] = mapped_column(index=True)
    claimed_at: Mapped[datetime.datetime | None]
    started_at: Mapped[datetime.datetime | None]
    finished_at: Mapped[datetime.datetime | None] = mapped_column(index=True)
    lease_renewed_at: Mapped[datetime.datetime | None]
    lease_expires_at: Mapped[datetime.datetime | None] = mapped_column(index=True)
    lease_s: Mapped[float | None]
    host: Mapped[str | None]
    exit_code: Mapped[int | None]
    exit_by_signal: Mapped[bool | None]
    exit_signal: Mapped[int | None]
    duration_s: Mapped[float | None]
    result_bytes: Mapped[int | None]
    command: Mapped[str | None] = mapped_column(Text)
    arguments: Mapped[list[Any] | None]
    cpus: Mapped[int] = mapped_column(default=1)
    memory_mb: Mapped[int] = mapped_column(default=0)
    disk_mb: Mapped[int] = mapped_column(default=0)
    requirements: Mapped[str | None] = mapped_column(Text)
    job_name: Mapped[str | None]
    array_id: Mapped[str | None] = mapped_column(index=True)
    array_index: Mapped[int | None]
    array_size: Mapped[int | None]
    notify_user: Mapped[str | None]
    notify_url: Mapped[str | None] = mapped_column(Text)
    notification: Mapped[str | None] = mapped_column(String(16))
    reply_to: Mapped[str | None]
    correlation_id: Mapped[str | None]
    request: Mapped[bytes | None]
    updated_at: Mapped[datetime.datetime | None]


class AttributeRow(Base):
    """An attribute a running job published (``dispatch chirp set NAME VALUE``)."""

    __tablename__ = "job_attributes"

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(default=1)
    at: Mapped[datetime.datetime | None]


class HistoryRow(Base):
    """One state change of a job; ``event_id`` makes applying an event idempotent."""

    __tablename__ = "job_history"
    __table_args__ = (Index("ix_job_history_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(String(400), unique=True)
    job_id: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int]
    event: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime.datetime]
    node: Mapped[str | None]
    detail: Mapped[str | None] = mapped_column(Text)


class NodeRow(Base):
    """An execute node as its latest heartbeat described it."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    pools: Mapped[list[Any]]
    machine: Mapped[dict[str, Any]]
    slots_total: Mapped[int] = mapped_column(default=0)
    slots_free: Mapped[int] = mapped_column(default=0)
    memory_free_mb: Mapped[int | None]
    running: Mapped[list[Any]]
    waiting: Mapped[int] = mapped_column(default=0)
    draining: Mapped[bool] = mapped_column(default=False)
    jobs_done: Mapped[int] = mapped_column(default=0)
    interval_s: Mapped[float] = mapped_column(default=5.0)
    lease_s: Mapped[float | None]
    started_at: Mapped[datetime.datetime | None]
    last_job_at: Mapped[datetime.datetime | None]
    last_heartbeat_at: Mapped[datetime.datetime | None]
    offline_at: Mapped[datetime.datetime | None]
    offline_reason: Mapped[str | None] = mapped_column(Text)


class ControlRow(Base):
    """An accepted control request (remove, hold, release), kept for good."""

    __tablename__ = "control_requests"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(16))
    job_ids: Mapped[list[Any]]
    reason: Mapped[str | None] = mapped_column(Text)
    by: Mapped[str]
    at: Mapped[datetime.datetime]


class PoolRow(Base):
    """A pool's fallback policy, as the running ledger's pools file declares it.

    Kept so that ``dispatch explain`` (any process that reads the database) can say
    where a waiting job will fall back to; the ledger rewrites the table at start.
    """

    __tablename__ = "pool_policies"

    pool: Mapped[str] = mapped_column(String(128), primary_key=True)
    fallback_after_s: Mapped[float]
    fallbacks: Mapped[dict[str, Any]]
