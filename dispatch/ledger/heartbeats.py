"""A node's row, as its latest heartbeat describes it."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from dispatch.ledger.models import NodeRow
from dispatch.ledger.times import maybe_time


def update_node(node: NodeRow, body: Mapping[str, Any], at: datetime.datetime) -> None:
    """Copy a heartbeat into ``node``; a heartbeat after an offline event brings it back."""
    node.pools = [str(p) for p in body.get("pools") or ()]
    node.machine = dict(body.get("machine") or {})
    node.slots_total = int(body.get("slots_total") or 0)
    node.slots_free = int(body.get("slots_free") or 0)
    node.memory_free_mb = body.get("memory_free_mb")
    node.running = [dict(r) for r in body.get("running") or ()]
    node.waiting = int(body.get("waiting") or 0)
    node.draining = bool(body.get("draining"))
    node.jobs_done = int(body.get("jobs_done") or 0)
    node.interval_s = float(body.get("interval_s") or 5.0)
    node.lease_s = body.get("lease_s")
    node.started_at = maybe_time(body.get("started_at"))
    node.last_job_at = maybe_time(body.get("last_job_at"))
    node.last_heartbeat_at = at
    if node.offline_at is not None and node.offline_at < at:
        node.offline_at, node.offline_reason = None, None
