"""Names and arguments of every exchange and queue Dispatch uses, defined once.

Pure: no I/O and no kombu. :mod:`dispatch.broker` turns these into declarations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_POOL = "default"
MAX_PRIORITY = 9
REPLY_QUEUE_EXPIRES_S = 7 * 24 * 3600

_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def jobs_exchange() -> str:
    """Return the durable direct exchange jobs are published to, keyed by pool."""
    return "dispatch.jobs"


def dead_letter_exchange() -> str:
    """Return the fanout exchange that receives dead-lettered job messages."""
    return "dispatch.dlx"


def dead_letter_queue() -> str:
    """Return the durable queue bound to the dead-letter exchange."""
    return "dispatch.dead"


def pool_queue(pool: str) -> str:
    """Return the durable queue of a pool; it is bound to the jobs exchange with key ``pool``."""
    return f"dispatch.pool.{check_pool_name(pool)}"


def pool_queue_arguments() -> dict[str, object]:
    """Return the queue arguments every pool queue is declared with."""
    return {
        "x-queue-type": "classic",
        "x-max-priority": MAX_PRIORITY,
        "x-dead-letter-exchange": dead_letter_exchange(),
    }


def reply_queue(client_id: str) -> str:
    """Return the durable reply queue of one client."""
    return f"dispatch.reply.{check_client_id(client_id)}"


def reply_queue_arguments(expires_s: int = REPLY_QUEUE_EXPIRES_S) -> dict[str, object]:
    """Return the arguments of a reply queue: it outlives its client, but not for ever."""
    return {"x-queue-type": "classic", "x-expires": expires_s * 1000}


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


def ledger_queue_arguments() -> dict[str, object]:
    """Return the arguments of the ledger's queues: what it cannot read is dead-lettered."""
    return {"x-queue-type": "classic", "x-dead-letter-exchange": dead_letter_exchange()}


def node_control_queue(node: str) -> str:
    """Return a node's durable control queue: it keeps cancels sent while the node is away."""
    return f"dispatch.control.{check_pool_name(node)}"


NODE_CONTROL_EXPIRES_S = 24 * 3600


def node_name_queue(node: str) -> str:
    """Return the exclusive queue that holds a node's name while the node is connected.

    Exclusive queues belong to one connection: a second node declaring the same one is
    refused (RESOURCE_LOCKED), so two nodes can never serve under one name.
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
