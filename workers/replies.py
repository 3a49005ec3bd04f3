"""Replies and dead letters, published with asynchronous publisher confirms."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import amqp

from dispatch import broker, headers, topology
from dispatch.archive import ZIP_CONTENT_TYPE
from dispatch.job import JobState

log = logging.getLogger(__name__)

Settle = Callable[[bool], None]


class Replies:
    """Publishes a node's replies on one confirm-mode channel; never waits for the broker."""

    def __init__(self, channel: amqp.Channel, host: str) -> None:
        self.host = host
        self.confirms = broker.Confirms(channel, on_return=self._returned)

    def send(self, env: headers.Envelope, state: JobState, body: bytes, *,
             settle: Settle | None = None, **fields: Any) -> None:
        """Publish one reply to the job's ``reply_to``; ``settle(ok)`` runs on the confirm."""
        if env.reply_to is None:
            raise ValueError(f"job {env.job_id}: no reply address")
        props: dict[str, Any] = {"correlation_id": env.correlation_id, "message_id": env.job_id}
        if body:
            props["content_type"] = ZIP_CONTENT_TYPE
        msg = broker.message(body, headers.reply_headers(state, env, **fields), **props)
        self.confirms.publish(msg, env.reply_to.exchange, env.reply_to.routing_key,
                              on_settled=settle)

    def dead_letter(self, message: Any, reason: str, *, settle: Settle) -> None:
        """Publish a copy of a rejected job message, with the reason, to the dead-letter exchange.

        The original is acked only once this copy is confirmed (``settle``).
        """
        # The broker refuses a user_id that is not the publisher's own: the owner
        # travels on as a header instead.
        props = {k: v for k, v in message.properties.items()
                 if k not in ("application_headers", "expiration", "user_id") and v is not None}
        info = message.delivery_info
        extra = {
            headers.REASON: reason,
            "x-original-user-id": message.properties.get("user_id") or "",
            "x-dispatch-rejected-by": self.host,
            "x-original-exchange": info.get("exchange", ""),
            "x-original-routing-key": info.get("routing_key", ""),
        }
        msg = amqp.Message(message.body, application_headers={**(message.headers or {}), **extra},
                           **props)
        self.confirms.publish(msg, topology.dead_letter_exchange(), "", on_settled=settle)

    def _returned(self, msg: amqp.Message, detail: str) -> None:
        job_id = (msg.properties.get("application_headers") or {}).get(headers.JOB_ID)
        log.warning("job %s: reply could not be delivered: %s", job_id, detail)
