"""Server metadata keys Dispatch writes on the servers it boots, defined once. Pure.

Nova keeps them with the server, so any host running the reaper (or two of them)
reads the same lifetime: ``created-by=dispatch``, ``pool``, ``owner``,
``lifetime_s``, ``created_at`` and ``expires_at`` (ISO-8601 UTC). The reaper adds
``drain_requested_at``/``drain_reason`` when it drains a node and
``notice_sent_at`` when it warned that the lifetime ends soon. Servers booted for one
multi-node job also carry ``gang`` (the job id), ``gang_head`` (its head node),
``gang_seen_at`` (when its head last said it gathers) and, once it runs,
``gang_started_at``: any host finds them by these, and their server group by name.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

CREATED_BY = "created-by"
CREATOR = "dispatch"
POOL = "pool"
OWNER = "owner"
LIFETIME_S = "lifetime_s"
CREATED_AT = "created_at"
EXPIRES_AT = "expires_at"
DRAIN_REQUESTED_AT = "drain_requested_at"
DRAIN_REASON = "drain_reason"
NOTICE_SENT_AT = "notice_sent_at"
GANG = "gang"
GANG_HEAD = "gang_head"
GANG_SEEN_AT = "gang_seen_at"
GANG_STARTED_AT = "gang_started_at"


def stamp(moment: datetime.datetime) -> str:
    """Return ``moment`` as ISO-8601 UTC, seconds precision."""
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds")


def parse_time(text: str | None) -> datetime.datetime | None:
    """Return an aware UTC datetime from ISO-8601 text, or None when absent or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def initial(*, pool: str, owner: str, lifetime_s: int,
            now: datetime.datetime) -> dict[str, str]:
    """Return the metadata of a server Dispatch boots now."""
    return {
        CREATED_BY: CREATOR,
        POOL: pool,
        OWNER: owner,
        LIFETIME_S: str(lifetime_s),
        CREATED_AT: stamp(now),
        EXPIRES_AT: stamp(now + datetime.timedelta(seconds=lifetime_s)),
    }


def gang(*, job_id: str, head: str, now: datetime.datetime) -> dict[str, str]:
    """Return the metadata that marks a server as booted for the multi-node job ``job_id``."""
    return {GANG: job_id, GANG_HEAD: head, GANG_SEEN_AT: stamp(now)}


def gang_group(job_id: str) -> str:
    """Return the name of the server group of the servers booted for ``job_id``."""
    return f"dispatch-{job_id}"


def is_ours(metadata: Mapping[str, str]) -> bool:
    """Tell whether a server was booted by Dispatch."""
    return metadata.get(CREATED_BY) == CREATOR


def expires_at(metadata: Mapping[str, str],
               created: datetime.datetime | None = None) -> datetime.datetime | None:
    """Return when a server's lifetime ends: ``expires_at``, else creation + ``lifetime_s``."""
    explicit = parse_time(metadata.get(EXPIRES_AT))
    if explicit is not None:
        return explicit
    start = parse_time(metadata.get(CREATED_AT)) or created
    try:
        lifetime_s = int(metadata.get(LIFETIME_S, ""))
    except ValueError:
        return None
    return start + datetime.timedelta(seconds=lifetime_s) if start else None


def extended(metadata: Mapping[str, str], extra_s: int, now: datetime.datetime,
             created: datetime.datetime | None = None) -> dict[str, str]:
    """Return the metadata updates that give a server ``extra_s`` more seconds of life.

    The new end is ``extra_s`` after the current end, or after now when that has passed.
    """
    if extra_s <= 0:
        raise ValueError(f"duration must be positive, got {extra_s} s")
    current = expires_at(metadata, created) or now
    new_end = max(current, now) + datetime.timedelta(seconds=extra_s)
    start = parse_time(metadata.get(CREATED_AT)) or created or now
    return {EXPIRES_AT: stamp(new_end),
            LIFETIME_S: str(int((new_end - start).total_seconds()))}
