"""Fallback pools: which pools are down, where a waiting job goes, and what explain says.

A pool is *live* while one of its nodes is online and not draining (the heartbeats
the ledger keeps). A job waiting in a pool that is not live falls back once it has
waited ``fallback_after`` with no live node: counted from the latest of when it was
queued there, when the pool's last node stopped being live, and when this ledger
started watching (a ledger that has just started has not heard the heartbeats yet).
It goes to the first fallback pool of its kind that is live; a job with
``NoFallback`` never moves. The moving itself is :mod:`dispatch.ledger.reroute`'s.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from dispatch import headers
from dispatch.ledger import capture
from dispatch.ledger.models import JobRow, PoolRow
from dispatch.ledger.records import JobRecord, LedgerState, NodeRecord
from dispatch.ledger.store import Ledger
from dispatch.pools import PoolPolicy, job_kind

#: The history event of a job the ledger moved to a fallback pool.
REROUTED = "job.rerouted"
#: How many heartbeat intervals a node stays live after its last heartbeat (as NodeRecord).
_LIVE_INTERVALS = 3


@dataclass(frozen=True)
class Liveness:
    """Which pools have a live node, and since when the others have had none."""

    live: frozenset[str]
    #: When each pool's last node stopped being live; a pool absent here never had one.
    ended: Mapping[str, datetime.datetime]

    def is_live(self, pool: str) -> bool:
        """Tell whether ``pool`` has an online node that is not draining."""
        return pool in self.live

    def first_live(self, policy: PoolPolicy, kind: str) -> str | None:
        """Return the first live fallback of ``kind`` jobs of ``policy``'s pool, if any."""
        return next((p for p in policy.fallbacks_for(kind) if p in self.live), None)

    def due_at(self, policy: PoolPolicy, queued_at: datetime.datetime,
               watching_since: datetime.datetime | None = None) -> datetime.datetime:
        """Return when a job queued at ``queued_at`` in a pool with no live node falls back."""
        start = max(t for t in (queued_at, self.ended.get(policy.pool), watching_since)
                    if t is not None)
        return start + datetime.timedelta(seconds=policy.fallback_after_s)


def liveness(nodes: Sequence[NodeRecord]) -> Liveness:
    """Return what the nodes' heartbeats say of every pool they serve."""
    live: set[str] = set()
    ended: dict[str, datetime.datetime] = {}
    for node in nodes:
        if node.online and not node.draining:
            live.update(node.pools)
            continue
        if node.draining or node.last_heartbeat_at is None:
            continue  # a draining node takes no new job: it never counts as live
        until = node.last_heartbeat_at + datetime.timedelta(
            seconds=_LIVE_INTERVALS * (node.interval_s or 5.0))
        for pool in node.pools:
            ended[pool] = max(until, ended.get(pool, until))
    return Liveness(frozenset(live), {p: t for p, t in ended.items() if p not in live})


def wants_fallback(raw_headers: Mapping[str, Any]) -> bool:
    """Tell whether a job message may be rerouted (it does not say ``NoFallback: true``)."""
    return not headers.is_true(raw_headers.get(headers.NO_FALLBACK))


def rerouted_detail(source: str, target: str, policy: PoolPolicy) -> str:
    """Return the history detail of a job moved from ``source`` to ``target``."""
    return (f"rerouted from {source} to {target}: no live node in {source} for "
            f"{policy.fallback_after_s:g}s")


def save_policies(ledger: Ledger, policies: Mapping[str, PoolPolicy]) -> None:
    """Make the database's pool policies those of ``policies`` (the running ledger's)."""
    with ledger.transaction() as session:
        session.execute(delete(PoolRow))
        for policy in policies.values():
            session.add(PoolRow(pool=policy.pool, fallback_after_s=policy.fallback_after_s,
                                fallbacks={k: list(v) for k, v in policy.fallbacks.items()}))


def load_policies(ledger: Ledger) -> dict[str, PoolPolicy]:
    """Return the pool policies the running ledger declared, by pool."""
    with ledger.transaction() as session:
        return {row.pool: PoolPolicy(row.pool, row.fallback_after_s,
                                     {str(k): tuple(v) for k, v in (row.fallbacks or {}).items()})
                for row in session.scalars(select(PoolRow))}


def explain_notes(ledger: Ledger, job: JobRecord, nodes: Sequence[NodeRecord],
                  now: datetime.datetime) -> list[str]:
    """Return what ``dispatch explain`` says of fallbacks: past reroutes, and the plan."""
    history = ledger.history(job.job_id)
    notes = [e.detail for e in history if e.event == REROUTED and e.detail]
    if job.state is not LedgerState.IDLE or job.control_op:
        return notes
    state = liveness(nodes)
    if state.is_live(job.pool):
        return notes
    queued = history[-1].at if history else job.submitted_at  # queued there last
    plan = _plan(ledger, job, state, queued or now, now)
    return [*notes, plan] if plan else notes


def _plan(ledger: Ledger, job: JobRecord, state: Liveness, queued: datetime.datetime,
          now: datetime.datetime) -> str | None:
    """Say where a job waiting in a pool with no live node goes, and when."""
    policy = load_policies(ledger).get(job.pool)
    raw = _stored_headers(ledger, job.job_id)
    if not wants_fallback(raw):
        return f"NoFallback: it waits for a node of pool {job.pool}"
    if policy is None:
        return None
    kind = job_kind(raw)
    choices = policy.fallbacks_for(kind)
    if not choices:
        return f"pool {job.pool} declares no fallback for {kind} jobs"
    target = state.first_live(policy, kind)
    if target is None:
        return (f"no live fallback for {kind} jobs: {', '.join(choices)} "
                f"{'has' if len(choices) == 1 else 'have'} no live node either; "
                f"it stays in {job.pool}")
    left = (state.due_at(policy, queued) - now).total_seconds()
    when = f"in {max(1, int(left))}s" if left > 0 else "at the ledger's next check"
    return (f"falls back to pool {target} ({kind} job) {when}: no live node in pool {job.pool} "
            f"(fallback_after {policy.fallback_after_s:g}s)")


def queued_at(row: JobRow) -> datetime.datetime | None:
    """Return when a job was last queued in its pool (submitted, sent again, rerouted)."""
    return row.updated_at or row.submitted_at


def _stored_headers(ledger: Ledger, job_id: str) -> Mapping[str, Any]:
    with ledger.transaction() as session:
        data = session.scalar(select(JobRow.request).where(JobRow.job_id == job_id))
    if not data:
        return {}
    raw = capture.unpack(data).get("headers") or {}
    return raw if isinstance(raw, Mapping) else {}
