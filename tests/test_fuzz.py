"""Thousands of hostile messages from foreign producers: the node never dies, nothing is lost.

Messages come from raw py-amqp (including content headers crafted byte by byte) and from
pika, never through Dispatch's client. Every message the broker confirmed must end in
exactly one of: a final reply (Exited or Rejected) on the test's reply queue, a copy in
the dead-letter exchange, or a file on the node's spool; a Rejected one both replied to
(when it named a reachable reply address) and dead-lettered. Then a good job still runs.
"""

from __future__ import annotations

import collections
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pika
import pika.exceptions
import pytest
from fuzz_messages import Generator, Hostile

from dispatch import topology
from dispatch.client import Client
from dispatch.job import JobSpec

from conftest import Workers

pytestmark = pytest.mark.timeout(600)

COUNT = int(os.environ.get("DISPATCH_FUZZ_COUNT", "2000"))
SEED = int(os.environ.get("DISPATCH_FUZZ_SEED", "20261206"))
FINAL_STATES = {"Exited", "Rejected", "Removed", "Held"}
_MARK = re.compile(rb"fz-mark-(\d+);")


class _RawMessage(amqp.Message):  # type: ignore[misc]
    """A py-amqp message whose property block is sent exactly as given."""

    def __init__(self, body: bytes, raw: bytes) -> None:
        super().__init__(body)
        self.raw = raw

    def _serialize_properties(self) -> bytes:
        return self.raw


class Publishers:
    """One py-amqp and one pika connection, both in confirm mode; reopened if the broker closes them."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.amqp: amqp.Connection | None = None
        self.channel: Any = None
        self.pika: pika.BlockingConnection | None = None
        self.pika_channel: Any = None

    def publish(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        """Publish ``msg``; return whether the broker confirmed it."""
        if msg.via_pika and msg.raw_properties is None:
            try:
                return self._pika(msg, exchange, routing_key)
            except (TypeError, ValueError, UnicodeError, AssertionError, OverflowError):
                pass  # pika cannot encode this one: py-amqp sends it
        return self._amqp(msg, exchange, routing_key)

    def _amqp(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        if self.amqp is None:
            self.amqp = amqp.Connection(f"{self.host}:{self.port}", userid="guest",
                                        password="guest", heartbeat=0)
            self.amqp.connect()
            self.channel = self.amqp.channel()
            self.channel.confirm_select()
        if msg.raw_properties is not None:
            out: amqp.Message = _RawMessage(msg.body, msg.raw_properties)
        else:
            out = amqp.Message(msg.body, application_headers=msg.headers, **msg.properties)
        try:
            self.channel.basic_publish_confirm(out, exchange=exchange, routing_key=routing_key,
                                               confirm_timeout=30)
        except (amqp.exceptions.AMQPError, OSError):
            self._close_amqp()
            return False
        return True

    def _pika(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        if self.pika is None:
            params = pika.ConnectionParameters(host=self.host, port=self.port, heartbeat=0,
                                               credentials=pika.PlainCredentials("guest", "guest"))
            self.pika = pika.BlockingConnection(params)
            self.pika_channel = self.pika.channel()
            self.pika_channel.confirm_delivery()
        props = pika.BasicProperties(headers=msg.headers, **msg.properties)
        try:
            self.pika_channel.basic_publish(exchange, routing_key, msg.body, props)
        except (pika.exceptions.AMQPError, OSError):
            self._close_pika()
            return False
        return True

    def _close_amqp(self) -> None:
        if self.amqp is not None:
            try:
                self.amqp.close()
            except Exception:  # the broker already closed it
                pass
        self.amqp = self.channel = None

    def _close_pika(self) -> None:
        if self.pika is not None:
            try:
                self.pika.close()
            except Exception:
                pass
        self.pika = self.pika_channel = None

    def close(self) -> None:
        """Close both connections."""
        self._close_amqp()
        self._close_pika()


def _seq_of_dead_letter(msg: amqp.Message) -> int | None:
    hdrs = msg.properties.get("application_headers") or {}
    seq = hdrs.get("x-fz-seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    for value in hdrs.values():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        found = _MARK.search(data)
        if found:
            return int(found.group(1))
    return None


def _state(hdrs: dict[str, Any]) -> str:
    return str(hdrs.get("JobState", "")).strip('"')


@pytest.fixture
def fuzz_node(broker_url: str, workdir_root: Path,
              tmp_path: Path) -> Iterator[tuple[str, Workers, Path]]:
    """One node, with its spool in the test's directory, serving a pool of its own."""
    pool = f"fz-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    workers = Workers(broker_url, workdir_root, tmp_path)
    workers.start("--spool-dir", str(spool), pools=(pool,))
    yield pool, workers, spool
    workers.stop_all()


def test_two_thousand_hostile_messages_never_kill_the_node_and_none_is_dropped(
        broker_url: str, rabbitmq_proc: Any, fuzz_node: tuple[str, Workers, Path]) -> None:
    pool, workers, spool = fuzz_node
    (node,) = workers.procs
    conn = amqp.Connection(f"{rabbitmq_proc.host}:{rabbitmq_proc.port}", userid="guest",
                           password="guest", heartbeat=0)
    conn.connect()
    ch = conn.channel()
    replies = f"fz.replies.{uuid.uuid4().hex[:8]}"
    dead = f"fz.dead.{uuid.uuid4().hex[:8]}"
    ch.queue_declare(replies, durable=True, auto_delete=False)
    ch.queue_bind(replies, "amq.direct", routing_key=replies)
    ch.queue_declare(dead, durable=False, auto_delete=False)
    ch.queue_bind(dead, topology.dead_letter_exchange(), routing_key="")

    gen = Generator(SEED, replies)
    publishers = Publishers(rabbitmq_proc.host, rabbitmq_proc.port)
    sent: dict[int, Hostile] = {}
    refused_by_broker = 0
    kinds: collections.Counter[str] = collections.Counter()
    try:
        for seq in range(COUNT):
            msg = gen.make(seq)
            if publishers.publish(msg, topology.jobs_exchange(), pool):
                sent[seq] = msg
                kinds[msg.kind] += 1
            else:
                refused_by_broker += 1
            assert node.poll() is None, f"node died after message {seq} ({msg.kind}): " \
                                        f"{workers.log()}"
    finally:
        publishers.close()

    finals: dict[int, list[str]] = collections.defaultdict(list)
    dead_copies: collections.Counter[int] = collections.Counter()
    untraced: set[int] = set(sent)
    last_progress = time.monotonic()
    while untraced and time.monotonic() - last_progress < 60:
        got_any = False
        for queue in (replies, dead):
            while (msg := ch.basic_get(queue, no_ack=True)) is not None:
                got_any = True
                if queue == dead:
                    seq = _seq_of_dead_letter(msg)
                    if seq is not None:
                        dead_copies[seq] += 1
                        untraced.discard(seq)
                    continue
                hdrs = dict(msg.properties.get("application_headers") or {})
                corr = str(msg.properties.get("correlation_id", ""))
                if corr.startswith("fz-") and _state(hdrs) in FINAL_STATES:
                    seq = int(corr[3:])
                    finals[seq].append(_state(hdrs))
                    if _state(hdrs) == "Exited" or not sent[seq].replies_to_us:
                        untraced.discard(seq)
        parked = _parked(spool)
        untraced -= parked
        if got_any:
            last_progress = time.monotonic()
        else:
            time.sleep(0.2)
        assert node.poll() is None, f"node died: {workers.log()}"
    # Late duplicates would show up now.
    time.sleep(1.0)
    while (msg := ch.basic_get(dead, no_ack=True)) is not None:
        if (seq := _seq_of_dead_letter(msg)) is not None:
            dead_copies[seq] += 1
    while (msg := ch.basic_get(replies, no_ack=True)) is not None:
        corr = str(msg.properties.get("correlation_id", ""))
        hdrs = dict(msg.properties.get("application_headers") or {})
        if corr.startswith("fz-") and _state(hdrs) in FINAL_STATES:
            finals[int(corr[3:])].append(_state(hdrs))
    parked = _parked(spool)
    conn.close()

    rejected = sum(1 for s in sent if "Rejected" in finals.get(s, []))
    exited = sum(1 for s in sent if "Exited" in finals.get(s, []))
    print(f"\nfuzz seed {SEED}: {len(sent)} confirmed by the broker, {refused_by_broker} "
          f"refused by it; {exited} Exited, {rejected} Rejected replies, "
          f"{sum(dead_copies.values())} dead-letter copies, {len(parked)} parked; "
          f"kinds {dict(kinds)}")

    assert len(sent) >= 2000 or COUNT < 2000
    dropped = sorted(untraced)
    assert not dropped, f"{len(dropped)} messages silently dropped, e.g. " + \
        ", ".join(f"{s} ({sent[s].kind})" for s in dropped[:10]) + f"\n{workers.log()}"
    for seq, msg in sent.items():
        states = finals.get(seq, [])
        assert len(states) <= 1, f"message {seq} ({msg.kind}) got finals {states}"
        assert dead_copies[seq] <= 1, f"message {seq} ({msg.kind}) dead-lettered twice"
        kept = dead_copies[seq] + (seq in parked)
        if states == ["Exited"]:
            assert kept == 0, f"message {seq} ({msg.kind}) ran and was dead-lettered"
        else:
            assert kept == 1, f"message {seq} ({msg.kind}): {states}, kept {kept} times"
        if msg.replies_to_us and kept and seq not in parked:
            assert states == ["Rejected"], f"message {seq} ({msg.kind}): no Rejected reply"
    assert exited > 0 and rejected > 0

    with Client(broker_url) as client:
        result = client.submit(JobSpec("echo", ("still", "serving"), pool=pool)).wait(
            timeout_s=60)
    assert result.exit_code == 0
    assert node.poll() is None


def _parked(spool: Path) -> set[int]:
    found: set[int] = set()
    if not spool.is_dir():
        return found
    for meta in spool.glob("*.json"):
        for hit in _MARK.finditer(meta.read_bytes()):
            found.add(int(hit.group(1)))
        text = meta.read_text(errors="replace")
        for hit in re.finditer(r'"(?:job_id|correlation_id)": "fz-(\d+)"', text):
            found.add(int(hit.group(1)))
    return found
