"""Lifecycle events and control messages: msgpack maps on the events and control exchanges.

Pure: no I/O and no kombu. The wire contract (``schemas/event.schema.json`` and
``schemas/control.schema.json`` describe it):

- Events go to the durable topic exchange ``dispatch.events``, persistent and
  publisher-confirmed, ``content_type`` ``application/x-msgpack``, with routing key
  ``<event>.<pool>`` for job events (``job.claimed.default``) and ``<event>.<node>``
  for node events (``node.heartbeat.node-1``). ``message_id`` is the event's id, so a
  consumer can fold redeliveries: ``<job_id>/<attempt>/<event>`` for job events.
- Every event body carries ``event``, ``at`` (ISO-8601 UTC) and ``node``; job events
  also ``job_id``, ``attempt`` and ``pool``.
- Control messages go to the durable topic exchange ``dispatch.control``: job
  operations with key ``job.<op>`` (every node listens), node operations with key
  ``node.<name>.<op>``, operations for every node (shutdown) with ``nodes.<op>``.
  Nodes obey only senders whose broker-validated ``user_id`` they trust. Users'
  requests (``rm``, ``hold``, ``release``) go to the ledger's control queue, which
  checks ownership and answers on ``reply_to``.
"""

from __future__ import annotations

import datetime
import decimal
import enum
from collections.abc import Mapping
from typing import Any

import msgpack

from dispatch.errors import InvalidMessageError

CONTENT_TYPE = "application/x-msgpack"
#: Largest event or control body a consumer accepts (a claim carries the job's inputs).
MAX_BODY_BYTES = 128 * 1024 * 1024
#: How the offline reason of an SSH host that stopped answering begins (it comes back).
HOST_DOWN_PREFIX = "down: "


class Event(enum.StrEnum):
    """What happened: the ``event`` field and the first part of the routing key."""

    CLAIMED = "job.claimed"  # a node took the job; carries the whole request
    RUNNING = "job.running"
    ATTRIBUTE = "job.attribute"  # the job published an attribute (chirp)
    EXITED = "job.exited"
    REMOVED = "job.removed"
    HELD = "job.held"
    RELEASED = "job.released"
    REJECTED = "job.rejected"
    REQUEUED = "job.requeued"  # the ledger sent the job out again (lease expired, release)
    GATHERING = "job.gathering"  # a multi-node job's head holds some nodes, wants more
    HEARTBEAT = "node.heartbeat"
    OFFLINE = "node.offline"

    @property
    def is_node_event(self) -> bool:
        """Tell whether this event is about a node rather than a job."""
        return self.value.startswith("node.")


class ControlOp(enum.StrEnum):
    """What a control message asks for."""

    REMOVE = "remove"
    HOLD = "hold"
    RELEASE = "release"
    DRAIN = "drain"
    SYNC = "sync"
    #: The head of a multi-node job lets a member node go (dispatch/gang.py).
    GANG_RELEASE = "gang-release"
    #: Every node (of some pools) stops taking jobs, finishes or hands back its own, exits.
    SHUTDOWN = "shutdown"

    @property
    def is_node_op(self) -> bool:
        """Tell whether this operation is addressed to one node rather than to jobs."""
        return self in (ControlOp.DRAIN, ControlOp.GANG_RELEASE)

    @property
    def is_broadcast(self) -> bool:
        """Tell whether this operation goes to every node (key ``nodes.<op>``)."""
        return self is ControlOp.SHUTDOWN


def now() -> str:
    """Return the current time as ISO-8601 UTC with microseconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def routing_key(event: Event, subject: str) -> str:
    """Return the routing key of an event about ``subject`` (a pool or a node name)."""
    return f"{event.value}.{subject}"


def ledger_bindings() -> tuple[str, ...]:
    """Return the keys the ledger's queue is bound with: every event but claims.

    Claims go straight to the ledger's queue (default exchange, mandatory), so a node
    learns from an unroutable claim that no ledger keeps its jobs; a queue that merely
    watches the events (a dashboard) must never make a node ack early.
    """
    return tuple(f"{e.value}.#" for e in Event if e is not Event.CLAIMED)


def control_key(op: ControlOp, node: str | None = None) -> str:
    """Return the routing key of a control message; node operations name their node."""
    if op.is_node_op:
        if not node:
            raise ValueError(f"control operation {op} needs a node name")
        return f"node.{node}.{op.value}"
    if op.is_broadcast:
        return f"nodes.{op.value}"
    return f"job.{op.value}"


def event_id(body: Mapping[str, Any]) -> str:
    """Return the idempotency key of an event body."""
    if "job_id" in body:
        return f"{body['job_id']}/{body.get('attempt', 1)}/{body['event']}"
    return f"{body.get('node')}/{body['event']}/{body.get('at')}"


def job_event(event: Event, *, job_id: str, attempt: int, pool: str, node: str,
              **fields: Any) -> dict[str, Any]:
    """Return the body of a job event."""
    return {"event": event.value, "at": now(), "node": node, "job_id": job_id,
            "attempt": attempt, "pool": pool, **fields}


def node_event(event: Event, *, node: str, **fields: Any) -> dict[str, Any]:
    """Return the body of a node event."""
    return {"event": event.value, "at": now(), "node": node, **fields}


def capture_request(properties: Mapping[str, Any], headers: Mapping[str, Any],
                    body: bytes | str) -> dict[str, Any]:
    """Return a job message as a msgpack-able map, so it can be published again later."""
    props = {k: v for k, v in properties.items()
             if k != "application_headers" and v is not None}
    raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body)
    return {"properties": _plain(props), "headers": _plain(dict(headers)), "body": raw}


def encode(body: Mapping[str, Any]) -> bytes:
    """Encode an event or control body."""
    # surrogatepass: a foreign header may hold text that is not valid UTF-8 (py-amqp
    # keeps such bytes as lone surrogates); it travels on and decodes back unchanged.
    packed: bytes = msgpack.packb(_plain(dict(body)), use_bin_type=True,
                                  unicode_errors="surrogatepass")
    return packed


def decode(data: bytes, *, what: str = "event") -> dict[str, Any]:
    """Decode an event or control body; raise InvalidMessageError when it is not one."""
    if len(data) > MAX_BODY_BYTES:
        raise InvalidMessageError(f"is larger than {MAX_BODY_BYTES} bytes", field="body")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True,
                               unicode_errors="surrogatepass")
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise InvalidMessageError(f"is not msgpack: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise InvalidMessageError(f"must be a msgpack map, got {type(body).__name__}",
                                  field="body")
    key = "event" if what == "event" else "op"
    if not isinstance(body.get(key), str):
        raise InvalidMessageError(f"has no {key!r} string", field=key)
    return body


def _plain(value: Any) -> Any:
    """Turn AMQP header values msgpack cannot carry (datetimes, decimals) into strings."""
    if isinstance(value, dict):
        return {k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k):
                _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value
