"""What the ledger sends: jobs sent out again, replies to clients, control broadcasts.

Every publish is persistent and confirmed by the broker before :meth:`flush` returns;
a job sent out again is also ``mandatory``, so an unroutable one is an error, not a loss.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import amqp

from dispatch import broker, events, headers, topology
from dispatch.errors import UnroutableError
from dispatch.job import JobState

log = logging.getLogger(__name__)

#: Properties a job message keeps when the ledger sends it out again.
_KEPT = ("message_id", "reply_to", "correlation_id", "priority", "expiration", "content_type",
         "content_encoding", "type", "app_id")


class Publisher(Protocol):
    """The ledger's way out; tests and a future Celery task may bring their own."""

    def send_job(self, pool: str, request: Mapping[str, Any], attempt: int) -> None:
        """Publish a stored job message again with header ``Attempt`` = ``attempt``."""

    def reply(self, request: Mapping[str, Any], attempt: int, state: JobState,
              **fields: Any) -> None:
        """Tell the job's client about a state the ledger decided (``reason``, ``hold_reason``)."""

    def broadcast(self, body: Mapping[str, Any]) -> None:
        """Send a control message to every node."""

    def answer(self, reply_to: str, correlation_id: str | None,
               body: Mapping[str, Any]) -> None:
        """Answer a control request (a msgpack map) on its ``reply_to``."""

    def flush(self) -> None:
        """Wait until the broker has confirmed everything published so far."""


class AmqpPublisher:
    """A :class:`Publisher` on one confirm-mode py-amqp channel."""

    def __init__(self, channel: amqp.Channel, user: str,
                 queue_type: str = topology.CLASSIC) -> None:
        self.user = user
        self.queue_type = queue_type
        self._confirms = broker.Confirms(channel, on_return=self._returned)
        self._seqs: list[int] = []
        self._returned_ids: list[str] = []

    def send_job(self, pool: str, request: Mapping[str, Any], attempt: int) -> None:
        """Publish a stored job message again, mandatory, with ``Attempt`` = ``attempt``."""
        props = {k: v for k, v in (request.get("properties") or {}).items() if k in _KEPT}
        if request.get("properties", {}).get("user_id") == self.user:
            props["user_id"] = self.user  # only our own user id passes the broker's check
        raw = {**(request.get("headers") or {}), headers.ATTEMPT: attempt}
        msg = broker.message(bytes(request.get("body") or b""), raw, **props)
        # Back where it first came from: the jobs exchange and its pool, or the custom
        # exchange and key a node served (HTCondor's amq.direct topology, say); with no
        # exchange recorded, its priority level's.
        priority = props.get("priority")
        exchange = str(request.get("exchange") or (
            topology.jobs_exchange_for(priority, self.queue_type) if isinstance(priority, int)
            else topology.jobs_exchange()))
        key = str(request.get("routing_key") or pool)
        with broker.translated(f"sending job {props.get('message_id')} to pool {pool!r}"):
            self._seqs.append(self._confirms.publish(msg, exchange, key, mandatory=True))

    def reply(self, request: Mapping[str, Any], attempt: int, state: JobState,
              **fields: Any) -> None:
        """Publish a reply in ``state`` to the job's ``reply_to``; no address, no reply."""
        env = headers.envelope(request.get("properties") or {}, request.get("headers") or {})
        address = env.reply_to
        if address is None:
            return
        env = dataclasses.replace(env, attempt=attempt)
        hold_reason = fields.pop("hold_reason", None)
        hdrs = headers.reply_headers(state, env, **fields)
        if hold_reason is not None:
            hdrs[headers.HOLD_REASON] = (headers.quote(hold_reason) if env.classad_quoted
                                         else hold_reason)
        msg = broker.message(b"", hdrs, correlation_id=env.correlation_id,
                             message_id=env.job_id)
        with broker.translated(f"replying to job {env.job_id}"):
            self._seqs.append(self._confirms.publish(
                msg, address.exchange, address.routing_key, mandatory=False))

    def broadcast(self, body: Mapping[str, Any]) -> None:
        """Publish a control message on the control exchange with key ``job.<op>``."""
        op = events.ControlOp(body["op"])
        msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                             user_id=self.user)
        with broker.translated(f"broadcasting {op.value}"):
            self._seqs.append(self._confirms.publish(
                msg, topology.control_exchange(), events.control_key(op), mandatory=False))

    def answer(self, reply_to: str, correlation_id: str | None,
               body: Mapping[str, Any]) -> None:
        """Publish the answer to a control request, msgpack, to ``reply_to``."""
        try:
            address = topology.ReplyAddress.parse(reply_to)
        except ValueError as exc:
            log.warning("control answer not sent: bad reply_to: %s", exc)
            return
        props: dict[str, Any] = {"content_type": events.CONTENT_TYPE}
        if correlation_id:
            props["correlation_id"] = correlation_id
        msg = broker.message(events.encode(body), {}, **props)
        with broker.translated("answering a control request"):
            self._seqs.append(self._confirms.publish(
                msg, address.exchange, address.routing_key, mandatory=False))

    def flush(self) -> None:
        """Wait for every confirm; raise UnroutableError for a job no queue took."""
        seqs, self._seqs = self._seqs, []
        with broker.translated("waiting for publisher confirms"):
            for seq in seqs:
                self._confirms.wait_for(seq)
        returned, self._returned_ids = self._returned_ids, []
        if returned:
            raise UnroutableError(f"job(s) {', '.join(returned)}: no queue bound for the pool")

    def _returned(self, msg: amqp.Message, detail: str) -> None:
        job_id = str(msg.properties.get("message_id"))
        log.error("job %s: sent out again but unroutable: %s", job_id, detail)
        self._returned_ids.append(job_id)


__all__ = ["AmqpPublisher", "Publisher"]
