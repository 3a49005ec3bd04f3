"""Servers for multi-node jobs: boot a gathering job's shortfall in its own server group,
delete them when the job ends.

The head of a multi-node job says how many nodes it holds and wants in ``job.gathering``
events (:mod:`dispatch.gang`, ``schemas/event.schema.json``). When it holds fewer than
``max`` and node tokens still wait, unclaimed, in its pool's queue (no idle node took
them), the cloud plane boots what is missing: at least ``min - held``, aiming for
``max - held``, less the servers it already booted for that job, within the quotas.
They boot into the server group ``dispatch-<job id>`` and carry the job in their
metadata (:mod:`workers.cloud.metadata`), so counting them again is what makes a
repeated event boot nothing more, from this process or after a restart.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatch.errors import InvalidMessageError
from workers.cloud import metadata, provisioner
from workers.cloud.flavors import Need
from workers.cloud.servers import Cloud, Server
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)
#: Refresh ``gang_seen_at`` on a gathering job's servers at most this often.
SEEN_REFRESH_S = 60


@dataclass(frozen=True)
class Gathering:
    """What a ``job.gathering`` event says of one multi-node job."""

    job_id: str
    pool: str
    head: str
    held: int
    min: int
    max: int
    need: Need
    started: bool

    @classmethod
    def from_event(cls, body: Mapping[str, Any]) -> Gathering:
        """Read a ``job.gathering`` body; raise InvalidMessageError naming a bad field."""
        def number(name: str, default: int | None = None, least: int = 0) -> int:
            value = body.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidMessageError(f"must be an integer of at least {least}", field=name)
            return value

        def text(name: str) -> str:
            value = body.get(name)
            if not isinstance(value, str) or not value:
                raise InvalidMessageError("must be a non-empty string", field=name)
            return value

        return cls(job_id=text("job_id"), pool=text("pool"), head=text("node"),
                   held=number("held", least=1), min=number("min", least=1),
                   max=number("max", least=1), started=body.get("started") is True,
                   need=Need(cpus=number("cpus", 1, 1), memory_mb=number("memory_mb", 0),
                             scratch_mb=number("disk_mb", 0)))


def shortfall(gathering: Gathering, booted: int, unclaimed: int) -> tuple[int, int]:
    """Return ``(least, most)`` servers to boot for a gathering job. Pure.

    ``booted`` servers exist for it already (booting or joined: counting joined ones
    twice errs on booting too few, never too many); ``unclaimed`` messages wait in its
    pool's queue, so at most that many tokens found no idle node.
    """
    if gathering.started:
        return 0, 0
    most = max(0, min(gathering.max - gathering.held - booted, unclaimed))
    least = max(0, min(gathering.min - gathering.held - booted, most))
    return least, most


def servers_of(servers: list[Server], job_id: str) -> list[Server]:
    """Return the servers booted for ``job_id`` that may still serve it (not in ERROR)."""
    return [s for s in servers if s.metadata.get(metadata.GANG) == job_id
            and s.status != "ERROR"]


def provision(cloud: Cloud, settings: CloudSettings, gathering: Gathering, unclaimed: int,
              now: datetime.datetime | None = None) -> list[Server]:
    """Boot what ``gathering`` lacks (none when quotas cannot reach its minimum); return
    the new servers, not yet bootstrapped."""
    now = now or datetime.datetime.now(datetime.UTC)
    job = gathering.job_id
    ours = servers_of(cloud.servers(), job)
    least, most = shortfall(gathering, len(ours), unclaimed)
    if most == 0:
        return []
    order = provisioner.Order(pool=gathering.pool, need=gathering.need, gang=job,
                              head=gathering.head)
    _, flavor = provisioner.choose(cloud, settings, order, now)
    used = provisioner.usage(cloud.servers(), cloud.flavors())
    room = provisioner.allowed(most, flavor, used, settings)
    if room < max(1, least):
        log.warning("job %s: the quotas leave room for %d x %s, it needs %d more node(s) "
                    "to start; booting none", job, room, flavor.name, max(1, least))
        return []
    log.info("job %s: holds %d of %d-%d nodes, %d booted for it, %d unclaimed: %d x %s "
             "in group %s", job, gathering.held, gathering.min, gathering.max, len(ours),
             unclaimed, room, flavor.name, metadata.gang_group(job))
    order = provisioner.Order(pool=gathering.pool, count=room, need=gathering.need, gang=job,
                              head=gathering.head)
    return provisioner.provision(cloud, settings, order, now=now, bootstrap_now=False)


def note(cloud: Cloud, gathering: Gathering, now: datetime.datetime | None = None) -> int:
    """Record on the job's servers that its head spoke (and whether the job started);
    return how many were updated."""
    now = now or datetime.datetime.now(datetime.UTC)
    updated = 0
    for server in servers_of(cloud.servers(), gathering.job_id):
        values = {}
        seen = metadata.parse_time(server.metadata.get(metadata.GANG_SEEN_AT))
        if seen is None or (now - seen).total_seconds() >= SEEN_REFRESH_S:
            values[metadata.GANG_SEEN_AT] = metadata.stamp(now)
        if gathering.started and not server.metadata.get(metadata.GANG_STARTED_AT):
            values[metadata.GANG_STARTED_AT] = metadata.stamp(now)
        if values:
            cloud.update_metadata(server.id, values)
            updated += 1
    return updated


def release(cloud: Cloud, job_id: str, why: str) -> list[str]:
    """Delete every server booted for ``job_id`` and its server group; return the
    servers' names. Running it again finds nothing more to do."""
    deleted = []
    for server in cloud.servers():
        if server.metadata.get(metadata.GANG) == job_id:
            cloud.delete(server.id)
            deleted.append(server.name)
            log.info("job %s: server %s deleted (%s)", job_id, server.name, why)
    delete_group(cloud, job_id)
    return deleted


def delete_group(cloud: Cloud, job_id: str) -> bool:
    """Delete the server group of ``job_id`` if it exists; return whether one was deleted."""
    group = cloud.find_server_group(metadata.gang_group(job_id))
    if group is None:
        return False
    gone = cloud.delete_server_group(group.id)
    if gone:
        log.info("job %s: server group %s deleted", job_id, group.name)
    return gone
