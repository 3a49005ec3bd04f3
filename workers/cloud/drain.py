"""Asking a node to drain: a msgpack control message on the control exchange.

The node obeys only senders the broker validated, so the message carries the
``user_id`` property set to the broker user of our own connection.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

from dispatch import broker, events, topology
from dispatch.events import ControlOp

log = logging.getLogger(__name__)


def broker_user(broker_url: str) -> str:
    """Return the user name in an AMQP URL (RabbitMQ's default, guest, when it names none)."""
    return unquote(urlsplit(broker_url).username or "guest")


def request_drain(broker_url: str, nodes: list[tuple[str, str]], *, by: str) -> None:
    """Publish a confirmed, persistent drain request to each ``(node, reason)``."""
    if not nodes:
        return
    user = broker_user(broker_url)
    conn = broker.connect(broker_url, heartbeat_s=0)
    try:
        with broker.translated("publishing drain requests"):
            channel = conn.channel()
            channel.exchange_declare(topology.control_exchange(), "topic", durable=True,
                                     auto_delete=False)
            confirms = broker.Confirms(channel)
            seqs = []
            for node, reason in nodes:
                body = events.encode({"op": ControlOp.DRAIN.value, "node": node,
                                      "reason": reason, "by": by, "at": events.now()})
                msg = broker.message(body, {}, content_type=events.CONTENT_TYPE,
                                     user_id=user)
                seqs.append(confirms.publish(msg, topology.control_exchange(),
                                             events.control_key(ControlOp.DRAIN, node),
                                             mandatory=False))
                log.info("node %s: drain requested (%s)", node, reason)
            for seq in seqs:
                confirms.wait_for(seq)
    finally:
        conn.release()
