"""Carrying out reap verdicts: drain, delete, warn; and extending a server's life.

:func:`reap` reads the servers and the ledger's nodes, asks
:func:`workers.cloud.reaping.judge` what to do, and (unless ``dry_run``) does it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

from workers.cloud import drain, gangs, metadata
from workers.cloud.bans import BootFailures
from workers.cloud.errors import CloudApiError
from workers.cloud.reaping import Action, NodeView, ReapPolicy, Verdict, judge
from workers.cloud.servers import Cloud, Server
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)


def policy(settings: CloudSettings) -> ReapPolicy:
    """Return the reaping policy the settings describe."""
    return ReapPolicy(boot_timeout_s=settings.boot_timeout_s,
                      idle_timeout_s=settings.idle_timeout_s,
                      drain_timeout_s=settings.drain_timeout_s, notice_s=settings.notice_s,
                      gang_silence_s=settings.gang_silence_s)


def ledger_nodes(ledger_url: str | None,
                 now: datetime.datetime) -> Mapping[str, NodeView] | None:
    """Return the ledger's nodes by name, or None when no ledger is configured."""
    if not ledger_url:
        return None
    from dispatch.ledger.store import Ledger  # noqa: PLC0415 - only when a ledger is set

    ledger = Ledger.open(ledger_url)
    try:
        return {node.name: node for node in ledger.nodes(now)}
    finally:
        ledger.close()


def reap(cloud: Cloud, settings: CloudSettings, *, dry_run: bool = False,
         now: datetime.datetime | None = None) -> list[Verdict]:
    """Judge every Dispatch server and, unless ``dry_run``, act; return the verdicts."""
    now = now or datetime.datetime.now(datetime.UTC)
    servers = cloud.servers()
    verdicts = judge(servers, ledger_nodes(settings.ledger_url, now), now, policy(settings))
    if not dry_run:
        carry_out(cloud, settings, verdicts, now)
        drop_gang_groups(cloud, servers, verdicts)
    return verdicts


def drop_gang_groups(cloud: Cloud, servers: list[Server], verdicts: list[Verdict]) -> None:
    """Delete the server group of each multi-node job whose last server was just deleted."""
    deleted = {v.server.id for v in verdicts if v.action is Action.DELETE}
    emptied = {s.metadata[metadata.GANG] for s in servers
               if s.id in deleted and s.metadata.get(metadata.GANG)}
    kept = {s.metadata.get(metadata.GANG) for s in servers if s.id not in deleted}
    for job in sorted(emptied - kept):
        gangs.delete_group(cloud, job)


def carry_out(cloud: Cloud, settings: CloudSettings, verdicts: list[Verdict],
              now: datetime.datetime) -> None:
    """Do what the verdicts say: drains first (one confirmed batch), then deletes, notices."""
    drains = [v for v in verdicts if v.action is Action.DRAIN]
    drain.request_drain(settings.broker_url, [(v.server.name, v.reason) for v in drains],
                        by=drain.broker_user(settings.broker_url))
    for verdict in drains:
        cloud.update_metadata(verdict.server.id, {metadata.DRAIN_REQUESTED_AT: metadata.stamp(now),
                                                  metadata.DRAIN_REASON: verdict.reason})
    failures = BootFailures(settings.state_dir, ban_after=settings.ban_after,
                            ban_for_s=settings.ban_for_s)
    flavor_names: dict[str, str] | None = None
    for verdict in verdicts:
        server = verdict.server
        if verdict.action is Action.DELETE:
            gone = not cloud.delete(server.id)
            log.info("server %s: deleted (%s)%s", server.name, verdict.reason,
                     " - it was already gone" if gone else "")
            if verdict.failed_boot:
                if flavor_names is None:
                    flavor_names = {f.id: f.name for f in cloud.flavors()}
                failures.record(flavor=flavor_names.get(server.flavor_id, server.flavor_id),
                                image=server.image_id, now=now)
        elif verdict.action is Action.NOTICE:
            log.warning("server %s: %s (pool %s, owner %s)", server.name, verdict.reason,
                        server.pool, server.metadata.get(metadata.OWNER, "?"))
            cloud.update_metadata(server.id, {metadata.NOTICE_SENT_AT: metadata.stamp(now)})


def extend(cloud: Cloud, node: str, extra_s: int,
           now: datetime.datetime | None = None) -> datetime.datetime:
    """Give the server named ``node`` ``extra_s`` more seconds; return its new end."""
    now = now or datetime.datetime.now(datetime.UTC)
    matches = [s for s in cloud.servers() if node in (s.name, s.id)]
    if not matches:
        raise CloudApiError(f"no Dispatch server named {node!r}")
    server = matches[0]
    updates = metadata.extended(server.metadata, extra_s, now, server.created_at)
    updates[metadata.NOTICE_SENT_AT] = ""
    cloud.update_metadata(server.id, updates)
    new_end = metadata.parse_time(updates[metadata.EXPIRES_AT])
    assert new_end is not None  # noqa: S101 - stamp() output always parses
    log.info("server %s: lifetime extended to %s", server.name, updates[metadata.EXPIRES_AT])
    return new_end
