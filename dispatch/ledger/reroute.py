"""Moving waiting jobs off a pool with no live node, to its first live fallback.

A pool with no live node has no consumer, so its job messages wait in its queue(s).
:meth:`Rerouter.check` takes them off with ``basic_get`` (only when the queue has no
consumer at all), decides each one (:mod:`dispatch.ledger.fallback`), and for a job
due to fall back: publishes a copy to the fallback pool (persistent, mandatory, with
``FallbackFrom``), waits for the broker's confirm, records the move in the job's
history, and only then acks the original. Everything else is put back where it was.

Never lost: the original stays unacked until the copy is confirmed (a crash puts it
back). Never twice: a message found in a pool the ledger has recorded its job as
rerouted from (same attempt) is the leftover of a move that was confirmed and recorded
but not yet acked, and is acked without a copy. The one window left is a ledger that
dies between a confirm and its commit (milliseconds): the job is then in both pools.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from dispatch import broker, events, headers, topology
from dispatch.errors import PublishNackedError, UnroutableError
from dispatch.job import JobState
from dispatch.ledger import capture
from dispatch.ledger.fallback import (
    REROUTED,
    Liveness,
    liveness,
    queued_at,
    rerouted_detail,
    wants_fallback,
)
from dispatch.ledger.leases import LEDGER_NODE
from dispatch.ledger.models import HistoryRow, JobRow
from dispatch.ledger.publisher import AmqpPublisher
from dispatch.ledger.records import LedgerState
from dispatch.ledger.store import Ledger, record_submission
from dispatch.ledger.transitions import Applier
from dispatch.pools import JOB_KINDS, PoolPolicy, job_kind

log = logging.getLogger(__name__)

#: Most messages of one queue looked at in one check (held unacked while deciding).
SCAN_MAX = 1000


@dataclass
class _Move:
    """One message taken off a queue, and what becomes of it."""

    message: Any
    #: The job's id; for a message without one, what it holds (it gets an id once moved).
    job_id: str
    attempt: int
    request: dict[str, Any]
    named: bool
    #: A named job the ledger had never heard of: recorded now, as first seen now.
    unknown: bool = False
    target: str | None = None
    duplicate: bool = False


@dataclass(frozen=True)
class _Scan:
    """One queue of a pool with no live node, looked at once."""

    policy: PoolPolicy
    state: Liveness
    level: str
    queue: str
    now: datetime.datetime


@dataclass
class Rerouter:
    """Reroutes due jobs of the pools in ``policies``, on a channel of its own."""

    channel: Any
    policies: Mapping[str, PoolPolicy]
    user: str
    queue_type: str = topology.CLASSIC
    watching_since: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC))
    _first_seen: dict[str, dict[str, datetime.datetime]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.publisher = AmqpPublisher(self.channel, self.user, self.queue_type)

    def check(self, ledger: Ledger, now: datetime.datetime) -> int:
        """Reroute every due job of every pool with no live node; return how many moved."""
        state = liveness(ledger.nodes(now))
        moved = 0
        for policy in self.policies.values():
            if state.is_live(policy.pool) or not any(
                    state.first_live(policy, kind) for kind in JOB_KINDS):
                continue
            ended = state.ended.get(policy.pool)
            since = max(self.watching_since, ended) if ended else self.watching_since
            if (now - since).total_seconds() < policy.fallback_after_s:
                continue  # no job there can be due yet
            for level, queue in topology.pool_queues(policy.pool, self.queue_type):
                moved += self._scan(ledger, _Scan(policy, state, level, queue, now))
        return moved

    def _scan(self, ledger: Ledger, scan: _Scan) -> int:
        policy, queue = scan.policy, scan.queue
        with broker.translated(f"looking at pool {policy.pool}'s queue"):
            _, count, consumers = self.channel.queue_declare(queue, passive=True)
        if not count or consumers:
            return 0  # empty, or someone consumes it after all: the ledger keeps out
        moves: list[_Move] = []
        try:
            with broker.translated(f"taking jobs off {queue}"):
                for _ in range(min(int(count), SCAN_MAX)):
                    msg = self.channel.basic_get(queue, no_ack=False)
                    if msg is None:
                        break
                    moves.append(_read(msg))
            self._decide(ledger, scan, moves)
            sent = self._send(policy, scan.level, [m for m in moves if m.target])
            self._record(ledger, policy, [m for m in moves if m.target or m.unknown], scan.now)
        finally:
            self._settle(moves, queue)
        return len(sent)

    def _decide(self, ledger: Ledger, scan: _Scan, moves: list[_Move]) -> None:
        policy, state, now = scan.policy, scan.state, scan.now
        seen = self._first_seen.get(scan.queue, {})
        self._first_seen[scan.queue] = first_seen = {}
        ids = [m.job_id for m in moves if m.named]
        rows: dict[str, JobRow] = {}
        gone: set[tuple[str, int]] = set()
        with ledger.transaction() as session:
            if ids:
                rows = {r.job_id: r for r in session.scalars(
                    select(JobRow).where(JobRow.job_id.in_(ids)))}
                gone = set(session.execute(
                    select(HistoryRow.job_id, HistoryRow.attempt).where(
                        HistoryRow.job_id.in_(ids), HistoryRow.event == REROUTED)).tuples())
            for move in moves:
                row = rows.get(move.job_id)
                if row is None:
                    move.unknown = move.named
                    since = first_seen[move.job_id] = seen.get(move.job_id, now)
                elif move.attempt != row.attempt:
                    continue  # an older copy, or one the ledger has not heard of yet
                elif row.pool != policy.pool and (move.job_id, move.attempt) in gone:
                    move.duplicate = True  # moved already; this copy was not yet acked
                    continue
                elif row.state != LedgerState.IDLE.value or row.control_op:
                    continue  # held, removed or claimed: not the ledger's to move
                else:
                    since = queued_at(row) or now
                if not wants_fallback(move.request["headers"]):
                    continue
                target = state.first_live(policy, job_kind(move.request["headers"]))
                if target is not None and now >= state.due_at(policy, since,
                                                              self.watching_since):
                    move.target = target

    def _send(self, policy: PoolPolicy, level: str, moves: list[_Move]) -> list[_Move]:
        """Publish each move's copy and wait for its confirm; return those the broker took."""
        sent = []
        for move in moves:
            target = str(move.target)
            if not move.named:
                move.job_id = uuid.uuid4().hex  # two such messages may hold the same
            request = move.request
            request["headers"] = {**request["headers"], headers.FALLBACK_FROM: policy.pool}
            request["properties"]["message_id"] = move.job_id
            request["exchange"], request["routing_key"] = topology.jobs_exchange(level), target
            detail = rerouted_detail(policy.pool, target, policy)
            try:
                # The client hears of it first: the node's Running cannot overtake it.
                self.publisher.reply(request, move.attempt, JobState.IDLE, reason=detail)
                self.publisher.send_job(target, request, move.attempt)
                self.publisher.flush()
            except (UnroutableError, PublishNackedError) as exc:
                log.error("job %s: not rerouted to pool %s: %s", move.job_id, target, exc)
                move.target = None
                continue
            sent.append(move)
            log.warning("job %s: %s", move.job_id, detail)
        return sent

    def _record(self, ledger: Ledger, policy: PoolPolicy, moves: list[_Move],
                now: datetime.datetime) -> None:
        """Note each move in its job's history (adding the jobs the ledger never saw)."""
        if not moves:
            return
        with ledger.transaction() as session:
            applier = Applier(session, ledger.forgotten_before)
            applier.load_jobs(m.job_id for m in moves)
            for move in moves:
                row = applier.job(move.job_id)
                if row is None:  # never heard of: recorded as submitted now, where it was
                    record_submission(applier, {**move.request, "pool": policy.pool,
                                                "at": now})
                    row = applier.job(move.job_id)
                if row is None or move.target is None:
                    continue
                detail = rerouted_detail(policy.pool, move.target, policy)
                row.pool, row.reason, row.updated_at = move.target, detail, now
                row.request = capture.pack({k: move.request[k]
                                            for k in ("properties", "headers", "body")})
                session.add(HistoryRow(event_id=None, job_id=row.job_id, attempt=row.attempt,
                                       event=REROUTED, state=row.state, at=now,
                                       node=LEDGER_NODE, detail=detail))

    def _settle(self, moves: list[_Move], queue: str) -> None:
        """Ack what was moved (or moved before); put everything else back in its place."""
        if not moves or not self.channel.is_open:
            return  # a closed channel gave every unacked message back already
        with broker.translated(f"settling jobs taken off {queue}"):
            for move in moves:
                tag = move.message.delivery_tag
                if move.target is not None or move.duplicate:
                    self.channel.basic_ack(tag)
                else:
                    self.channel.basic_reject(tag, requeue=True)


def _read(msg: Any) -> _Move:
    """Return a move for one message taken off a queue (nothing decided yet)."""
    props = {k: v for k, v in msg.properties.items() if k != "application_headers"}
    raw = dict(msg.headers or {})
    body = broker.raw_body(msg)
    env = headers.envelope(props, raw)
    named = bool(props.get("message_id") or headers.JOB_ID in raw)
    # A job without an id gets one now (a node would invent one anyway); until it
    # moves, it is known by what it holds.
    job_id = env.job_id if named else _fingerprint(raw, body)
    request = events.capture_request(props, raw, body)
    return _Move(msg, job_id, env.attempt, request, named)


def _fingerprint(raw: Mapping[str, Any], body: bytes) -> str:
    digest = hashlib.sha256(repr(sorted(raw.items(), key=lambda kv: kv[0])).encode())
    digest.update(body)
    return f"nameless-{uuid.UUID(bytes=digest.digest()[:16]).hex}"
