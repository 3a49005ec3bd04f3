"""Names and arguments of every exchange and queue Dispatch uses, defined once.

Pure: no I/O and no kombu. :mod:`dispatch.broker` turns these into declarations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_POOL = "default"
MAX_PRIORITY = 9

#: Queue types Dispatch can declare its durable queues as (``DISPATCH_QUEUE_TYPE``).
CLASSIC, QUORUM = "classic", "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)

#: Priority levels of a pool on quorum queues, served in this order; classic pools have
#: one priority queue instead. A job's AMQP priority picks its level (:func:`priority_level`).
HIGH, NORMAL, LOW = "high", "normal", "low"
PRIORITY_LEVELS = (HIGH, NORMAL, LOW)
#: Lowest priority of the high level, and highest of the low level (default 4 is normal).
HIGH_FROM_PRIORITY = 7
LOW_UP_TO_PRIORITY = 2
REPLY_QUEUE_EXPIRES_S = 7 * 24 * 3600

_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def jobs_exchange(level: str = NORMAL) -> str:
    """Return the durable direct exchange jobs are published to, keyed by pool.

    Classic pools use only the normal level's exchange; on quorum queues each priority
    level has its own exchange, so a job's routing key stays its pool name at every level.
    """
    return "dispatch.jobs" if level == NORMAL else f"dispatch.jobs.{_check_level(level)}"


def jobs_exchange_for(priority: int, queue_type: str = CLASSIC) -> str:
    """Return the exchange a job of AMQP ``priority`` is published to."""
    if check_queue_type(queue_type) == CLASSIC:
        return jobs_exchange()
    return jobs_exchange(priority_level(priority))


def priority_level(priority: int) -> str:
    """Return the level of a job's AMQP priority: high from 7, low up to 2, else normal."""
    if priority >= HIGH_FROM_PRIORITY:
        return HIGH
    if priority <= LOW_UP_TO_PRIORITY:
        return LOW
    return NORMAL


def check_queue_type(queue_type: str) -> str:
    """Return ``queue_type`` unchanged, or raise ValueError when Dispatch cannot use it."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"invalid queue type {queue_type!r}: use {' or '.join(QUEUE_TYPES)}")
    return queue_type


def _check_level(level: str) -> str:
    if level not in PRIORITY_LEVELS:
        raise ValueError(f"invalid priority level {level!r}")
    return level


def dead_letter_exchange() -> str:
    """Return the fanout exchange that receives dead-lettered job messages."""
    return "dispatch.dlx"


def dead_letter_queue() -> str:
    """Return the durable queue bound to the dead-letter exchange."""
    return "dispatch.dead"


def pool_queue(pool: str, level: str = NORMAL) -> str:
    """Return the durable queue of a pool at a priority level (the normal one by default).

    It is bound to :func:`jobs_exchange` of its level with key ``pool``. The normal level's
    queue is the pool's only queue on classic queues; other levels are named so that no
    pool name can collide with them (``-`` before the first ``.``).
    """
    check_pool_name(pool)
    if level == NORMAL:
        return f"dispatch.pool.{pool}"
    return f"dispatch.pool-{_check_level(level)}.{pool}"


def pool_queues(pool: str, queue_type: str = CLASSIC) -> list[tuple[str, str]]:
    """Return ``(level, queue)`` for every queue of a pool, highest level first."""
    if check_queue_type(queue_type) == CLASSIC:
        return [(NORMAL, pool_queue(pool))]
    return [(level, pool_queue(pool, level)) for level in PRIORITY_LEVELS]


def pool_queue_names(pool: str, queue_type: str = CLASSIC) -> list[str]:
    """Return the names of every queue of a pool, highest level first.

    Whatever counts a pool's waiting jobs reads all of them: one classic queue, or on
    quorum queues one queue a priority level (high, normal, low).
    """
    return [queue for _, queue in pool_queues(pool, queue_type)]


def pool_queue_arguments(queue_type: str = CLASSIC) -> dict[str, object]:
    """Return the queue arguments every pool queue is declared with.

    Quorum queues refuse ``x-max-priority`` (RabbitMQ 3.10): their priorities are levels.
    """
    if check_queue_type(queue_type) == QUORUM:
        return {"x-queue-type": QUORUM, "x-dead-letter-exchange": dead_letter_exchange()}
    return {
        "x-queue-type": CLASSIC,
        "x-max-priority": MAX_PRIORITY,
        "x-dead-letter-exchange": dead_letter_exchange(),
    }


def dead_letter_queue_arguments(queue_type: str = CLASSIC) -> dict[str, object] | None:
    """Return the dead-letter queue's arguments (none on classic, as it always was)."""
    return {"x-queue-type": QUORUM} if check_queue_type(queue_type) == QUORUM else None


def reply_queue(client_id: str) -> str:
    """Return the durable reply queue of one client."""
    return f"dispatch.reply.{check_client_id(client_id)}"


def reply_queue_arguments(expires_s: int = REPLY_QUEUE_EXPIRES_S,
                          queue_type: str = CLASSIC) -> dict[str, object]:
    """Return the arguments of a reply queue: it outlives its client, but not for ever."""
    return {"x-queue-type": check_queue_type(queue_type), "x-expires": expires_s * 1000}


def check_pool_name(pool: str) -> str:
    """Return ``pool`` unchanged, or raise ValueError when it is not a usable pool name."""
    if not _POOL_RE.match(pool):
        raise ValueError(f"invalid pool name {pool!r}: use letters, digits and _ . : -")
    return pool


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` unchanged, or raise ValueError when it cannot name a queue."""
    if not _CLIENT_ID_RE.match(client_id):
        raise ValueError(f"invalid client id {client_id!r}: use letters, digits and _ . : -")
    return client_id


@dataclass(frozen=True)
class ReplyAddress:
    """Where replies to one job go: an exchange and a routing key."""

    exchange: str
    routing_key: str

    @classmethod
    def parse(cls, reply_to: str) -> ReplyAddress:
        """Parse a ``reply_to`` property: a queue name, or ``/exchange/NAME/KEY``.

        A bare queue name is reached through the default exchange, as in RabbitMQ's
        RPC convention; the ``/exchange/NAME/KEY`` form is RabbitMQ's address syntax.
        """
        if reply_to.startswith("/exchange/"):
            rest = reply_to[len("/exchange/") :]
            name, _, key = rest.partition("/")
            if not name:
                raise ValueError(f"reply_to {reply_to!r} names no exchange")
            return cls(name, key)
        if reply_to.startswith("/queue/"):
            return cls("", reply_to[len("/queue/") :])
        if not reply_to or len(reply_to) > 255:
            raise ValueError("reply_to must be a queue name of 1-255 characters")
        return cls("", reply_to)

    def __str__(self) -> str:
        if not self.exchange:
            return self.routing_key
        return f"/exchange/{self.exchange}/{self.routing_key}"


def events_exchange() -> str:
    """Return the durable topic exchange every lifecycle event is published to."""
    return "dispatch.events"


def control_exchange() -> str:
    """Return the durable topic exchange of control messages (cancel, hold, drain)."""
    return "dispatch.control"


def ledger_queue() -> str:
    """Return the ledger's durable queue, bound to every event."""
    return "dispatch.ledger"


def ledger_control_queue() -> str:
    """Return the queue users' control requests (rm, hold, release) go to."""
    return "dispatch.ledger.control"


def ledger_submitted_queue() -> str:
    """Return the ledger's durable queue of submission copies, bound to the jobs exchange."""
    return "dispatch.ledger.submitted"


def ledger_queue_arguments(queue_type: str = CLASSIC) -> dict[str, object]:
    """Return the arguments of the ledger's queues: what it cannot read is dead-lettered."""
    return {"x-queue-type": check_queue_type(queue_type),
            "x-dead-letter-exchange": dead_letter_exchange()}


def node_control_queue(node: str) -> str:
    """Return a node's durable control queue: it keeps cancels sent while the node is away."""
    return f"dispatch.control.{check_pool_name(node)}"


NODE_CONTROL_EXPIRES_S = 24 * 3600


def node_name_queue(node: str) -> str:
    """Return the exclusive queue that holds a node's name while the node is connected.

    Exclusive queues belong to one connection: a second node declaring the same one is
    refused (RESOURCE_LOCKED), so two nodes can never serve under one name. It is a
    classic queue whatever ``DISPATCH_QUEUE_TYPE`` says: quorum queues cannot be exclusive.
    """
    return f"dispatch.node.{check_pool_name(node)}"


def dashboard_queue() -> str:
    """Return the durable queue ``dispatch flower-feed`` reads the events it shows from."""
    return "dispatch.dashboard"


#: Most events, and bytes, the dashboard queue keeps while its feed is away.
DASHBOARD_MAX_EVENTS = 100_000
DASHBOARD_MAX_BYTES = 256 * 1024 * 1024


def dashboard_queue_arguments() -> dict[str, object]:
    """Return the arguments of the dashboard queue: bounded, the oldest events dropped first.

    It has no dead-letter exchange, so a stopped feed never fills the dead-letter queue:
    the ledger's queue, which the feed requires, keeps (and dead-letters) every event.
    """
    return {"x-queue-type": "classic", "x-max-length": DASHBOARD_MAX_EVENTS,
            "x-max-length-bytes": DASHBOARD_MAX_BYTES, "x-overflow": "drop-head"}
