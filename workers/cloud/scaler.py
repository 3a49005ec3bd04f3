"""Autoscaling: per pool, boot nodes for the jobs waiting in its queue, within quotas.

For each pool in ``DISPATCH_CLOUD_POOLS`` with ready messages: the waiting jobs'
requests (from the ledger when configured, else one core per message) are summed,
less the free slots of the pool's online nodes and the cores of servers still
booting; the shortfall, in servers of the flavor that fits the largest waiting job,
is booted (as many as the quotas allow). Reaping retires them when idle.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence
from typing import Any

import amqp.exceptions
import kombu

from dispatch import broker, topology
from workers.cloud import metadata, provisioner, reaper
from workers.cloud.errors import CloudError
from workers.cloud.flavors import Need
from workers.cloud.servers import Cloud
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)


def largest(needs: Sequence[Need]) -> Need:
    """Return a need covering each of ``needs`` (the flavor for it fits every job)."""
    if not needs:
        return Need()
    return Need(cpus=max(n.cpus for n in needs), memory_mb=max(n.memory_mb for n in needs),
                scratch_mb=max(n.scratch_mb for n in needs))


def shortfall(depth: int, needs: Sequence[Need], free_slots: int, booting_slots: int,
              slots_per_node: int) -> int:
    """Return how many more nodes of ``slots_per_node`` the waiting jobs need."""
    known = sum(n.cpus for n in needs[:depth])
    waiting = known + max(0, depth - len(needs))
    missing = waiting - free_slots - booting_slots
    return math.ceil(missing / max(1, slots_per_node)) if missing > 0 else 0


def queue_depth(broker_url: str, pool: str, queue_type: str | None = None) -> int:
    """Return how many messages are ready in a pool's queues (0 for those that do not exist).

    On quorum queues a pool has a queue a priority level: jobs waiting at any level count.
    """
    names = topology.pool_queue_names(pool, broker.queue_type_in_use(queue_type))
    conn = broker.connect(broker_url, heartbeat_s=0)
    try:
        with broker.translated(f"reading the depth of pool {pool}"):
            return sum(_ready(conn, name) for name in names)
    finally:
        conn.release()


def _ready(conn: kombu.Connection, queue: str) -> int:
    """Return the ready messages of one queue, asked on a channel of its own (0 if missing)."""
    channel = conn.channel()  # a missing queue closes the channel it was asked on
    try:
        _, depth, _ = channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        return 0
    channel.close()
    return int(depth)


def waiting_needs(ledger_url: str | None, pool: str) -> list[Need]:
    """Return the requests of the pool's waiting jobs from the ledger (empty without one)."""
    if not ledger_url:
        return []
    from dispatch.ledger.records import LedgerState  # noqa: PLC0415 - only with a ledger
    from dispatch.ledger.store import Ledger  # noqa: PLC0415

    ledger = Ledger.open(ledger_url)
    try:
        jobs = ledger.jobs(states=[LedgerState.IDLE], pool=pool)
    finally:
        ledger.close()
    return [Need(cpus=j.cpus, memory_mb=j.memory_mb, scratch_mb=j.disk_mb) for j in jobs]


def autoscale(cloud: Cloud, settings: CloudSettings,
              now: datetime.datetime | None = None) -> list[dict[str, Any]]:
    """Boot what each configured pool lacks; return one entry per pool that got servers."""
    now = now or datetime.datetime.now(datetime.UTC)
    booted = []
    for pool in settings.pools:
        try:
            names = _scale_pool(cloud, settings, pool, now)
        except CloudError as exc:
            log.warning("pool %s: cannot scale up: %s", pool, exc)
            continue
        if names:
            booted.append({"pool": pool, "servers": names})
    return booted


def _scale_pool(cloud: Cloud, settings: CloudSettings, pool: str,
                now: datetime.datetime) -> list[str]:
    depth = queue_depth(settings.broker_url, pool)
    if depth == 0:
        return []
    needs = waiting_needs(settings.ledger_url, pool)
    order = provisioner.Order(pool=pool, need=largest(needs))
    _, flavor = provisioner.choose(cloud, settings, order, now)
    by_id = {f.id: f for f in cloud.flavors()}
    nodes = reaper.ledger_nodes(settings.ledger_url, now) or {}
    free = booting = 0
    for server in cloud.servers():
        if server.pool != pool or server.metadata.get(metadata.DRAIN_REQUESTED_AT):
            continue
        node = nodes.get(server.name)
        if node is not None and node.online:
            free += getattr(node, "slots_free", 0)
        elif node is None and server.status != "ERROR":
            size = by_id.get(server.flavor_id)
            booting += size.vcpus if size else 1
    count = shortfall(depth, needs, free, booting, flavor.vcpus)
    if count == 0:
        return []
    log.info("pool %s: %d waiting, %d free slots, %d booting: %d x %s", pool, depth, free,
             booting, count, flavor.name)
    order = provisioner.Order(pool=pool, count=count, need=order.need)
    return [s.name for s in provisioner.provision(cloud, settings, order, now=now,
                                                   partial=True)]
