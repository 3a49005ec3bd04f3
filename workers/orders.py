"""A node's control inbox: cancels, holds, releases, drains and shutdowns from trusted senders.

Each node has a durable queue bound to the control exchange for job operations
(``job.*``, sent by the ledger after it has checked who asked), for its own
node operations (``node.<name>.*``) and for operations on every node (``nodes.*``).
The queue outlives a disconnected node for a day, so a cancel sent while the node
was away is still honoured (a shutdown given before the node started is not). The node obeys
only senders whose broker-validated ``user_id`` it trusts; anything else is logged
and dead-lettered. Cancels and holds are remembered, so a queued job that arrives
after its cancel is dropped, not run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import amqp

from dispatch import events, topology
from dispatch.errors import InvalidMessageError
from dispatch.events import ControlOp

log = logging.getLogger(__name__)

REMEMBERED_ORDERS = 65536


class UntrustedOrderError(InvalidMessageError):
    """Raised when a control message comes from a sender the node does not trust."""


@dataclass(frozen=True)
class Order:
    """One control operation, as a node understands it."""

    op: ControlOp
    job_ids: tuple[str, ...]
    reason: str
    by: str
    #: The attempt of each job the order was given for; a later attempt is not bound by it.
    attempts: tuple[tuple[str, int], ...] = ()
    #: A shutdown's pools (empty: every node), whether running jobs go back to the queue,
    #: and when it was given (ISO-8601 UTC; a node started later ignores it).
    pools: tuple[str, ...] = ()
    requeue: bool = False
    at: str = ""

    def applies_to(self, job_id: str, attempt: int) -> bool:
        """Tell whether this order binds ``attempt`` of ``job_id``."""
        limit = dict(self.attempts).get(job_id)
        return limit is None or attempt <= limit

    def describe(self) -> str:
        """Return the reason a reply gives, naming who asked."""
        verb = {ControlOp.REMOVE: "removed", ControlOp.HOLD: "held"}.get(self.op, self.op.value)
        return f"{verb} by {self.by}" + (f": {self.reason}" if self.reason else "")


class Orders:
    """Parses control messages and remembers which jobs are removed or held."""

    def __init__(self, node: str, trusted: Iterable[str]) -> None:
        self.node = node
        self.trusted = frozenset(trusted)
        self.removed: collections.OrderedDict[str, Order] = collections.OrderedDict()
        self.held: collections.OrderedDict[str, Order] = collections.OrderedDict()

    def declare(self, channel: amqp.Channel) -> str:
        """Declare the control exchange and this node's control queue; return its name."""
        exchange = topology.control_exchange()
        queue = topology.node_control_queue(self.node)
        channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments={
            "x-expires": topology.NODE_CONTROL_EXPIRES_S * 1000,
            "x-dead-letter-exchange": topology.dead_letter_exchange(),
        })
        channel.queue_bind(queue, exchange, routing_key="job.*")
        channel.queue_bind(queue, exchange, routing_key=f"node.{self.node}.*")
        channel.queue_bind(queue, exchange, routing_key="nodes.*")
        return queue

    def parse(self, properties: dict[str, Any], body: bytes) -> Order:
        """Return the order a control message carries; raise InvalidMessageError if bad."""
        sender = properties.get("user_id")
        if not sender or sender not in self.trusted:
            raise UntrustedOrderError(f"sender {sender or '(no user_id)'} is not trusted by "
                                      f"node {self.node}", field="user_id")
        data = events.decode(body, what="control")
        try:
            op = ControlOp(data["op"])
        except ValueError:
            raise InvalidMessageError(f"unknown operation {data['op']!r}", field="op") from None
        job_ids = data.get("job_ids", [])
        if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
            raise InvalidMessageError("must be a list of job id strings", field="job_ids")
        if not (op.is_node_op or op.is_broadcast or op is ControlOp.SYNC) and not job_ids:
            raise InvalidMessageError(f"{op} names no job", field="job_ids")
        attempts = data.get("attempts") or {}
        if not isinstance(attempts, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in attempts.values()):
            raise InvalidMessageError("must map job ids to attempt numbers", field="attempts")
        pools = data.get("pools") or []
        if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
            raise InvalidMessageError("must be a list of pool names", field="pools")
        return Order(op, tuple(job_ids), str(data.get("reason") or ""),
                     str(data.get("by") or sender),
                     tuple((str(k), v) for k, v in attempts.items()),
                     pools=tuple(pools), requeue=data.get("requeue") is True,
                     at=str(data.get("at") or ""))

    def remember(self, order: Order) -> None:
        """Note the jobs an order removes, holds or releases."""
        for job_id in order.job_ids:
            if order.op is ControlOp.REMOVE:
                _put(self.removed, job_id, order)
                self.held.pop(job_id, None)
            elif order.op is ControlOp.HOLD:
                _put(self.held, job_id, order)
            elif order.op is ControlOp.RELEASE:
                self.held.pop(job_id, None)

    def stopping_order(self, job_id: str, attempt: int) -> Order | None:
        """Return the remove or hold order that keeps this attempt from running, if any."""
        for table in (self.removed, self.held):
            order = table.get(job_id)
            if order is not None and order.applies_to(job_id, attempt):
                return order
        return None


def _put(table: collections.OrderedDict[str, Order], job_id: str, order: Order) -> None:
    table[job_id] = order
    table.move_to_end(job_id)
    if len(table) > REMEMBERED_ORDERS:
        table.popitem(last=False)
