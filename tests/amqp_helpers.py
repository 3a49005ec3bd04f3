"""Raw AMQP helpers for tests that act as a foreign producer or inspect queues."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import amqp
import kombu

from dispatch import topology


def publish_job(conn: kombu.Connection, routing_key: str, headers: dict[str, Any], *,
                body: bytes = b"", exchange: str | None = None, **props: Any) -> None:
    """Publish a job message the way any AMQP client could, with no Dispatch code."""
    channel = conn.channel()
    try:
        msg = amqp.Message(body, application_headers=headers, delivery_mode=2, **props)
        channel.basic_publish(msg, exchange=topology.jobs_exchange() if exchange is None
                              else exchange, routing_key=routing_key)
    finally:
        channel.close()


def reply_queue(conn: kombu.Connection) -> str:
    """Declare a fresh durable queue for replies and return its name."""
    name = f"test.reply.{uuid.uuid4().hex[:10]}"
    channel = conn.channel()
    channel.queue_declare(name, durable=True, auto_delete=False)
    channel.close()
    return name


def get_messages(conn: kombu.Connection, queue: str, count: int,
                 timeout_s: float = 20.0) -> list[amqp.Message]:
    """Return the next ``count`` messages of ``queue`` (acked), waiting up to ``timeout_s``."""
    channel = conn.channel()
    found: list[amqp.Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            msg = channel.basic_get(queue, no_ack=True)
            if msg is None:
                time.sleep(0.02)
            else:
                found.append(msg)
    finally:
        channel.close()
    if len(found) < count:
        raise AssertionError(f"{queue}: got {len(found)} of {count} messages in {timeout_s}s")
    return found


def dead_letter_of(conn: kombu.Connection, job_id: str, timeout_s: float = 20.0) -> amqp.Message:
    """Return the dead-lettered copy of ``job_id`` from dispatch.dead."""
    channel = conn.channel()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = channel.basic_get(topology.dead_letter_queue(), no_ack=True)
            if msg is None:
                time.sleep(0.02)
                continue
            headers = msg.properties.get("application_headers") or {}
            if job_id in (msg.properties.get("message_id"), headers.get("JobId")):
                return msg
    finally:
        channel.close()
    raise AssertionError(f"no dead letter for job {job_id} within {timeout_s}s")


def headers_of(msg: amqp.Message) -> dict[str, Any]:
    """Return a received message's application headers."""
    return dict(msg.properties.get("application_headers") or {})


def wait_for_consumer(url: str, queue: str, *, timeout_s: float = 20.0,
                      gone: Callable[[], str | None] = lambda: None) -> None:
    """Wait until ``queue`` has a consumer; raise RuntimeError if ``gone()`` says why not.

    ``gone`` returns an explanation once the process that should consume has died.
    """
    deadline = time.monotonic() + timeout_s
    with kombu.Connection(url, heartbeat=0) as conn:
        while time.monotonic() < deadline:
            why = gone()
            if why is not None:
                raise RuntimeError(why)
            channel = conn.channel()
            try:
                _, _, consumers = channel.queue_declare(queue, passive=True)
                if consumers:
                    return
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            time.sleep(0.05)
    raise TimeoutError(f"no consumer on {queue} after {timeout_s}s")


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then SIGKILL those still running after 15 s."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
