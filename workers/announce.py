"""A node's lifecycle events: claims, job events and heartbeats on the events exchange.

Claims go straight to the ledger's queue, ``mandatory``: when no ledger queue exists
they come back, and the node knows that nobody keeps its jobs. It then skips claims
and per-job events (the job message stays unacked until its final reply is safe) and
looks for the ledger's queue again at each heartbeat, or when a starting ledger says
so. A queue that only watches the events exchange never counts as a ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import amqp
import kombu

from dispatch import broker, events, topology
from dispatch.events import Event

log = logging.getLogger(__name__)

Settle = Callable[[bool], None]


class Announcer:
    """Publishes one node's events through the node's confirm-mode channel."""

    def __init__(self, confirms: broker.Confirms, node: str) -> None:
        self.confirms = confirms
        self.node = node
        #: Whether a ledger listens: unknown (None) until a claim or heartbeat settles.
        self.listening: bool | None = None
        self._heartbeats = 0

    @property
    def claims_wanted(self) -> bool:
        """Tell whether jobs should be claimed (a ledger listens, or nobody knows yet)."""
        return self.listening is not False

    def claim(self, *, job_id: str, attempt: int, pool: str, request: Mapping[str, Any],
              lease_s: float, settle: Settle, node: str | None = None,
              started_at: str | None = None) -> None:
        """Publish a job's claim; ``settle(True)`` once a ledger holds it, else ``False``.

        ``node`` is the machine the job runs on, when not this node's own (an SSH host).
        ``started_at`` says the job started then: the claim is also its running event.
        """
        node = node or self.node
        fields: dict[str, Any] = {"started_at": started_at} if started_at else {}
        body = events.job_event(Event.CLAIMED, job_id=job_id, attempt=attempt, pool=pool,
                                node=node, host=node, request=dict(request),
                                lease_s=lease_s, **fields)

        def claimed(ok: bool) -> None:
            self.listening = ok
            settle(ok)

        msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                             message_id=events.event_id(body))
        self.confirms.publish(msg, "", topology.ledger_queue(), mandatory=True,
                              on_settled=claimed, settle_returned_as_failed=True)
        # Watchers (dashboards) see the claim too, without the job's input files.
        copy = {**body, "request": {**body["request"], "body": b""}}
        self._publish(copy, events.routing_key(Event.CLAIMED, pool), settle=None)

    def job(self, event: Event, *, job_id: str, attempt: int, pool: str,
            settle: Settle | None = None, must_land: bool = False, node: str | None = None,
            **fields: Any) -> None:
        """Publish a job event (running, attribute, exited, ...).

        The events of every job (running, exited) are skipped while no ledger listens;
        rarer ones are always sent. With ``must_land`` the event is mandatory and
        ``settle(False)`` says that nobody received it.
        """
        if self.listening is False and event in _HOT_PATH and not must_land:
            if settle is not None:
                settle(True)
            return
        body = events.job_event(event, job_id=job_id, attempt=attempt, pool=pool,
                                node=node or self.node, **fields)
        self._publish(body, events.routing_key(event, pool), settle=settle, watch=must_land)

    def heartbeat(self, node: str | None = None, **fields: Any) -> None:
        """Publish a heartbeat (the lease renewal of every job listed in it).

        ``node`` names another machine this node speaks for (an SSH host).
        """
        self._heartbeats += 1
        node = node or self.node
        body = events.node_event(Event.HEARTBEAT, node=node, seq=self._heartbeats, **fields)
        self._publish(body, events.routing_key(Event.HEARTBEAT, node), settle=None)

    def look_for_ledger(self, conn: kombu.Connection) -> None:
        """Check whether the ledger's queue exists (claims need it to be safe)."""
        found = broker.queue_exists(conn, topology.ledger_queue())
        if found != self.listening:
            log.info("node %s: %s", self.node, "a ledger keeps this node's jobs" if found
                     else "no ledger listens; jobs are acked at their end")
        self.listening = found

    def offline(self, reason: str, settle: Settle | None = None, node: str | None = None) -> None:
        """Publish that this node (or ``node``, an SSH host it speaks for) stops serving."""
        node = node or self.node
        body = events.node_event(Event.OFFLINE, node=node, reason=reason)
        self._publish(body, events.routing_key(Event.OFFLINE, node), settle=settle)

    def _publish(self, body: dict[str, Any], key: str, *, settle: Settle | None,
                 watch: bool = False) -> None:
        msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                             message_id=_message_id(body))
        self.confirms.publish(msg, topology.events_exchange(), key, mandatory=watch,
                              on_settled=settle, settle_returned_as_failed=watch)


_HOT_PATH = frozenset({Event.RUNNING, Event.EXITED})


def _message_id(body: Mapping[str, Any]) -> str:
    if body["event"] == Event.HEARTBEAT.value:
        return f"{body['node']}/heartbeat/{body['seq']}/{body['at']}"
    return events.event_id(body)


def declare(channel: amqp.Channel) -> None:
    """Declare the events exchange (once per connection)."""
    channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                             auto_delete=False)
