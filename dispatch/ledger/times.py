"""Times and leases: ISO-8601 in, aware UTC out; a lease runs ``lease_s`` from its last renewal."""

from __future__ import annotations

import datetime
from typing import Any

from dispatch.ledger.models import JobRow

#: Lease of a claim that names none.
DEFAULT_LEASE_S = 60.0


def parse_time(value: Any) -> datetime.datetime:
    """Return an ISO-8601 time as aware UTC; naive times are taken as UTC."""
    if isinstance(value, datetime.datetime):
        parsed = value
    else:
        parsed = datetime.datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC)


def maybe_time(value: Any) -> datetime.datetime | None:
    """Return :func:`parse_time` of ``value``, or None when it is empty."""
    return parse_time(value) if value else None


def renew_lease(job: JobRow, at: datetime.datetime) -> None:
    """Extend a job's lease from ``at`` (never shorten it)."""
    if job.lease_renewed_at is None or at > job.lease_renewed_at:
        job.lease_renewed_at = at
        job.lease_expires_at = at + datetime.timedelta(seconds=job.lease_s or DEFAULT_LEASE_S)


def end_lease(job: JobRow) -> None:
    """Forget a job's lease: no node holds it."""
    job.lease_renewed_at = job.lease_expires_at = None
