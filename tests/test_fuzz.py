"""Thousands of hostile messages from foreign producers: the node never dies, nothing is lost.

Messages come from raw py-amqp (including content headers crafted byte by byte) and from
pika, never through Dispatch's client. Every message the broker confirmed must end in
exactly one of: a final reply (Exited or Rejected) on the test's reply queue, a copy in
the dead-letter exchange, or a file on the node's spool; a Rejected one both replied to
(when it named a reachable reply address) and dead-lettered. Then a good job still runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import amqp
import pika
import pika.exceptions
import pytest
from fixtures_ledger import LedgerProcess
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
    """A py-amqp and a pika connection in confirm mode, reopened when the broker closes one."""

    def __init__(self, host: str, port: int, vhost: str = "/") -> None:
        self.host, self.port, self.vhost = host, port, vhost
        self.amqp: amqp.Connection | None = None
        self.channel: Any = None
        self.pika: pika.BlockingConnection | None = None
        self.pika_channel: Any = None
        #: Why the broker refused messages, with how many it refused for each reason.
        self.refusals: collections.Counter[str] = collections.Counter()

    def publish(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        """Publish ``msg``; return whether the broker confirmed it."""
        if msg.via_pika and msg.raw_properties is None:
            try:
                return self._pika(msg, exchange, routing_key)
            except (TypeError, ValueError, UnicodeError, AssertionError, OverflowError,
                    pika.exceptions.UnsupportedAMQPFieldException):
                self._close_pika()  # pika cannot encode this one: py-amqp sends it
        return self._amqp(msg, exchange, routing_key)

    def _amqp(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        if self.amqp is None:
            self.amqp = amqp.Connection(f"{self.host}:{self.port}", userid="guest",
                                        password="guest", heartbeat=0,
                                        virtual_host=self.vhost)
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
        except (amqp.exceptions.AMQPError, OSError) as exc:
            self.refusals[str(exc)[:80]] += 1
            self._close_amqp()
            return False
        return True

    def _pika(self, msg: Hostile, exchange: str, routing_key: str) -> bool:
        if self.pika is None:
            params = pika.ConnectionParameters(host=self.host, port=self.port, heartbeat=0,
                                               virtual_host=self.vhost,
                                               credentials=pika.PlainCredentials("guest", "guest"))
            self.pika = pika.BlockingConnection(params)
            self.pika_channel = self.pika.channel()
            self.pika_channel.confirm_delivery()
        props = pika.BasicProperties(headers=msg.headers, **msg.properties)
        try:
            self.pika_channel.basic_publish(exchange, routing_key, msg.body, props)
        except pika.exceptions.UnsupportedAMQPFieldException:
            raise  # pika's own limit, met before anything was sent
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.refusals[str(exc)[:80]] += 1
            self._close_pika()
            return False
        return True

    def _close_amqp(self) -> None:
        if self.amqp is not None:
            with contextlib.suppress(Exception):  # the broker may have closed it already
                self.amqp.close()
        self.amqp = self.channel = None

    def _close_pika(self) -> None:
        if self.pika is not None:
            with contextlib.suppress(Exception):
                self.pika.close()
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


class Tally:
    """What became of each message: final replies, dead-letter copies, spool files."""

    def __init__(self, sent: dict[int, Hostile], spool: Path) -> None:
        self.sent = sent
        self.spool = spool
        self.finals: dict[int, list[str]] = collections.defaultdict(list)
        self.dead: collections.Counter[int] = collections.Counter()
        self.ledger_dead: collections.Counter[int] = collections.Counter()
        self.parked: set[int] = set()

    def reply(self, msg: amqp.Message) -> None:
        """Count a reply: only finals, told by their correlation id."""
        hdrs = dict(msg.properties.get("application_headers") or {})
        corr = str(msg.properties.get("correlation_id", ""))
        if corr.startswith("fz-") and _state(hdrs) in FINAL_STATES:
            self.finals[int(corr[3:])].append(_state(hdrs))

    def dead_letter(self, msg: amqp.Message) -> None:
        """Count a dead-letter copy: the node's, or the ledger's (its queues dead-letter)."""
        seq = _seq_of_dead_letter(msg)
        if seq is None:
            return
        if "x-dispatch-rejected-by" in (msg.properties.get("application_headers") or {}):
            self.dead[seq] += 1
        else:  # the broker's copy of what the ledger's queue dead-lettered
            self.ledger_dead[seq] += 1

    def untraced(self) -> set[int]:
        """Return the messages nothing has been seen of yet."""
        self.parked = _parked(self.spool)
        return {seq for seq, msg in self.sent.items()
                if not (self.dead[seq] or seq in self.parked
                        or "Exited" in self.finals[seq]
                        or (self.finals[seq] and not msg.replies_to_us))}

    def check(self, seq: int) -> None:
        """Assert that message ``seq`` ended exactly once, and as it should."""
        msg, states = self.sent[seq], self.finals.get(seq, [])
        what = f"message {seq} ({msg.kind})"
        assert len(states) <= 1, f"{what} got finals {states}"
        assert self.dead[seq] <= 1, f"{what} dead-lettered twice"
        kept = self.dead[seq] + (seq in self.parked)
        if states == ["Exited"]:
            assert kept == 0, f"{what} ran and was dead-lettered"
        else:
            assert kept == 1, f"{what}: {states}, kept {kept} times"
            if msg.replies_to_us:
                assert states == ["Rejected"], f"{what}: no Rejected reply"

    def summary(self) -> str:
        """Return the counts, for the test's output."""
        exited = sum(1 for s in self.sent if "Exited" in self.finals.get(s, []))
        rejected = sum(1 for s in self.sent if "Rejected" in self.finals.get(s, []))
        return (f"{exited} Exited, {rejected} Rejected replies, {sum(self.dead.values())} "
                f"dead-letter copies, {len(self.parked)} parked, "
                f"{sum(self.ledger_dead.values())} dead-lettered by the ledger")


def _drain(ch: Any, replies: str, dead: str, tally: Tally) -> bool:
    got = False
    while (msg := ch.basic_get(replies, no_ack=True)) is not None:
        tally.reply(msg)
        got = True
    while (msg := ch.basic_get(dead, no_ack=True)) is not None:
        tally.dead_letter(msg)
        got = True
    return got


def _publish_all(gen: Generator, pool: str, publishers: Publishers, workers: Workers,
                 count: int) -> tuple[dict[int, Hostile], collections.Counter[str]]:
    """Publish until ``count`` messages are confirmed; return them and the kinds refused."""
    (node,) = workers.procs
    sent: dict[int, Hostile] = {}
    refused: collections.Counter[str] = collections.Counter()
    seq = -1
    while len(sent) < count and seq < 2 * count:
        seq += 1
        msg = gen.make(seq)
        if publishers.publish(msg, topology.jobs_exchange(), pool):
            sent[seq] = msg
        else:
            refused[msg.kind] += 1
        assert node.poll() is None, f"node died after message {seq} ({msg.kind}): {workers.log()}"
    return sent, refused


def test_two_thousand_hostile_messages_never_kill_the_node_and_none_is_dropped(
        broker_url: str, rabbitmq_proc: Any, workdir_root: Path, tmp_path: Path) -> None:
    _fuzz(broker_url, rabbitmq_proc, "/", workdir_root, tmp_path, COUNT)


def test_with_a_ledger_keeping_claims_and_events_no_hostile_message_kills_node_or_ledger(
        vhost_url: str, vhost: str, rabbitmq_proc: Any, workdir_root: Path, tmp_path: Path,
        ledger_service: LedgerProcess) -> None:
    # The ledger also takes a copy of every job message sent to a pool it tracks.
    _fuzz(vhost_url, rabbitmq_proc, vhost, workdir_root, tmp_path, COUNT // 2,
          ledger=ledger_service)


def _fuzz(url: str, rabbitmq_proc: Any, vhost: str, workdir_root: Path, tmp_path: Path,
          count: int, ledger: LedgerProcess | None = None) -> None:
    pool = f"fz-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    if ledger is not None:
        ledger.start("--pool", pool)
    workers = Workers(url, workdir_root, tmp_path)
    try:
        workers.start("--spool-dir", str(spool), pools=(pool,))
        _fuzz_node(url, rabbitmq_proc, vhost, pool, workers, spool, count, ledger)
    finally:
        workers.stop_all()


def _fuzz_node(url: str, rabbitmq_proc: Any, vhost: str, pool: str, workers: Workers,
               spool: Path, count: int, ledger: LedgerProcess | None) -> None:
    (node,) = workers.procs

    def alive() -> None:
        assert node.poll() is None, f"node died: {workers.log()}"
        if ledger is not None:
            assert ledger.proc is not None and ledger.proc.poll() is None, \
                f"ledger died: {ledger.log()}"

    conn = amqp.Connection(f"{rabbitmq_proc.host}:{rabbitmq_proc.port}", userid="guest",
                           password="guest", heartbeat=0, virtual_host=vhost)
    conn.connect()
    ch = conn.channel()
    replies = f"fz.replies.{uuid.uuid4().hex[:8]}"
    dead = f"fz.dead.{uuid.uuid4().hex[:8]}"
    ch.queue_declare(replies, durable=True, auto_delete=False)
    ch.queue_bind(replies, "amq.direct", routing_key=replies)
    ch.queue_declare(dead, durable=False, auto_delete=False)
    ch.queue_bind(dead, topology.dead_letter_exchange(), routing_key="")

    publishers = Publishers(rabbitmq_proc.host, rabbitmq_proc.port, vhost)
    try:
        sent, refused = _publish_all(Generator(SEED, replies), pool, publishers, workers, count)
    finally:
        publishers.close()
    tally = Tally(sent, spool)
    last_progress = time.monotonic()
    while tally.untraced() and time.monotonic() - last_progress < 60:
        if _drain(ch, replies, dead, tally):
            last_progress = time.monotonic()
        else:
            time.sleep(0.2)
        alive()
    time.sleep(1.0)  # late duplicates would show up now
    _drain(ch, replies, dead, tally)
    untraced = sorted(tally.untraced())
    conn.close()
    kinds = collections.Counter(m.kind for m in sent.values())
    _record(tally, ledger is not None, sum(refused.values()), len(untraced))
    print(f"\nfuzz seed {SEED}: {len(sent)} confirmed by the broker, "
          f"{sum(refused.values())} refused by it {dict(refused)}; {tally.summary()}; "
          f"kinds {dict(kinds)}; refusals {dict(publishers.refusals)}")

    assert len(sent) == count, f"the broker refused too many: {publishers.refusals}"
    assert not untraced, f"{len(untraced)} messages silently dropped, e.g. " + \
        ", ".join(f"{s} ({sent[s].kind})" for s in untraced[:10]) + f"\n{workers.log()}"
    for seq in sent:
        tally.check(seq)
    # Every way out was taken: jobs ran, were rejected, dead-lettered and parked.
    ended = collections.Counter(state for states in tally.finals.values() for state in states)
    assert ended["Exited"] and ended["Rejected"] and tally.parked and tally.dead

    with Client(url) as client:
        result = client.submit(JobSpec("echo", ("still", "serving"), pool=pool)).wait(
            timeout_s=60)
    assert result.exit_code == 0
    alive()


def _record(tally: Tally, with_ledger: bool, refused: int, untraced: int) -> None:
    """Append this run's counts to ``DISPATCH_FAULT_FIGURES`` (docs/reliability.md)."""
    path = os.environ.get("DISPATCH_FAULT_FIGURES")
    if not path:
        return
    ended = collections.Counter(s for states in tally.finals.values() for s in states)
    figures = {"scenario": "fuzz" + (" with a ledger" if with_ledger else ""), "seed": SEED,
               "confirmed": len(tally.sent), "refused_by_broker": refused,
               "exited": ended["Exited"], "rejected_replies": ended["Rejected"],
               "dead_letter_copies": sum(tally.dead.values()), "parked": len(tally.parked),
               "dead_lettered_by_ledger": sum(tally.ledger_dead.values()),
               "silently_dropped": untraced,
               "duplicates": sum(1 for s in tally.sent if len(tally.finals.get(s, [])) > 1
                                 or tally.dead[s] > 1)}
    with Path(path).open("a") as out:
        out.write(json.dumps(figures, sort_keys=True) + "\n")


def _parked(spool: Path) -> set[int]:
    """Return the messages kept on the node's spool (parked messages, or unroutable results)."""
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
