"""A cross-host lock per task: a RabbitMQ exclusive queue that dies with its connection.

Declaring an exclusive queue succeeds for one connection only; any other gets
``RESOURCE_LOCKED`` until that connection closes (normally, or because its host or
process died), so a crashed holder never leaves a stale lock behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import amqp.exceptions

from dispatch import broker
from workers.cloud.errors import LockBusyError

log = logging.getLogger(__name__)
REAP = "reap"
PROVISION = "provision"  # autoscale takes it too: one booting run at a time
LEASES = "leases"


def lock_queue(name: str) -> str:
    """Return the name of the exclusive queue that is the lock ``name``."""
    return f"dispatch.cloud.lock.{name}"


@contextmanager
def held(broker_url: str, name: str) -> Iterator[None]:
    """Hold the lock ``name`` for the block; raise LockBusyError when another holds it."""
    conn = broker.connect(broker_url, heartbeat_s=0)
    try:
        channel = conn.channel()
        try:
            channel.queue_declare(lock_queue(name), exclusive=True, auto_delete=True)
        except amqp.exceptions.ResourceLocked:
            raise LockBusyError(f"lock {name} is held by another run") from None
        log.debug("lock %s: taken", name)
        yield
    finally:
        conn.release()
