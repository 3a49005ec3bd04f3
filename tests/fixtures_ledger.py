"""Fixtures for the ledger: a private vhost per test, the real ``dispatch ledger`` process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu
import pytest

from dispatch import events, topology
from dispatch.ledger import Ledger

from amqp_helpers import wait_for_consumer

ROOT = Path(__file__).resolve().parent.parent


#: Vhosts are made, and deleted, this many at a time: each rabbitmqctl call boots an
#: Erlang VM (about 0.5 s), and one vhost made and deleted call by call took three.
VHOST_BATCH = 8


class Vhosts:
    """Fresh vhosts with guest's full permissions, made and deleted in batches.

    One ``rabbitmqctl eval`` makes (or deletes) a batch, calling what ``add_vhost``,
    ``set_permissions`` and ``delete_vhost`` call; any result but ``ok`` fails it. Each
    vhost goes to one test only; a used one is deleted, with its queues and connections,
    within the next ``VHOST_BATCH`` tests, and every one left at the end of the run.
    """

    def __init__(self, rabbitmq_proc: Any) -> None:
        self.rabbitmq_proc = rabbitmq_proc
        self.fresh: list[str] = []
        self.used: list[str] = []

    def take(self) -> str:
        """Return a vhost no test has used."""
        if not self.fresh:
            names = [f"ledger-{uuid.uuid4().hex[:10]}" for _ in range(VHOST_BATCH)]
            self._each(names, 'ok = rabbit_vhost:add(V, <<"tests">>), '
                              'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, '
                              'V, <<".*">>, <<".*">>, <<".*">>, <<"tests">>)')
            self.fresh = names
        return self.fresh.pop()

    def give_back(self, name: str) -> None:
        """Mark ``name`` used; delete the used ones once a batch of them is in."""
        self.used.append(name)
        if len(self.used) >= VHOST_BATCH:
            self.delete_all_used()

    def delete_all_used(self) -> None:
        """Delete every used vhost now."""
        names, self.used = self.used, []
        if names:
            self._each(names, 'ok = rabbit_vhost:delete(V, <<"tests">>)')

    def _each(self, names: list[str], body: str) -> None:
        vhosts = ", ".join(f'<<"{name}">>' for name in names)
        self.rabbitmq_proc.rabbitctl_output("eval", f"[begin {body} end || V <- [{vhosts}]].")


@pytest.fixture(scope="session")
def vhosts(rabbitmq_proc: Any) -> Iterator[Vhosts]:
    """The run's supply of fresh vhosts; the last ones are deleted at its end."""
    supply = Vhosts(rabbitmq_proc)
    yield supply
    supply.used += supply.fresh
    supply.delete_all_used()


@pytest.fixture
def vhost(vhosts: Vhosts) -> Iterator[str]:
    """A fresh vhost (the ledger's queue names are fixed, so each test gets its own)."""
    name = vhosts.take()
    yield name
    vhosts.give_back(name)


@pytest.fixture
def vhost_url(rabbitmq_proc: Any, vhost: str) -> str:
    """The guest URL of this test's vhost."""
    return f"amqp://guest:guest@{rabbitmq_proc.host}:{rabbitmq_proc.port}/{vhost}"


def user_url(rabbitmq_proc: Any, vhost: str, user: str, password: str) -> str:
    """Return the URL of ``user`` on ``vhost``."""
    return f"amqp://{user}:{password}@{rabbitmq_proc.host}:{rabbitmq_proc.port}/{vhost}"


class LedgerProcess:
    """A ``dispatch ledger`` subprocess and the database it writes."""

    def __init__(self, url: str, db_url: str, log_path: Path) -> None:
        self.url, self.db_url, self.log_path = url, db_url, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, env: dict[str, str] | None = None) -> LedgerProcess:
        """Start the service; return once it consumes its control queue."""
        cmd = [sys.executable, "-m", "dispatch", "ledger", "--broker", self.url, "--db",
               self.db_url, "--lease-check-s", "0.3", *args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **(env or {})})
        wait_consumed(self.url, topology.ledger_control_queue(), self)
        return self

    def log(self) -> str:
        """Return what the service wrote so far."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """SIGTERM the service and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def ledger(self) -> Ledger:
        """Open the service's database (close it when done)."""
        return Ledger.open(self.db_url)

    def wait_for(self, check: Callable[[Ledger], Any], timeout_s: float = 20.0) -> Any:
        """Poll the database until ``check`` returns something truthy; return it."""
        deadline = time.monotonic() + timeout_s
        led = self.ledger()
        try:
            while True:
                found = check(led)
                if found:
                    return found
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"ledger exited: {self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ledger never got there: {self.log()}")
                time.sleep(0.05)
        finally:
            led.close()


def wait_consumed(url: str, queue: str, owner: LedgerProcess, timeout_s: float = 20.0) -> None:
    """Wait until ``queue`` has a consumer."""
    def gone() -> str | None:
        if owner.proc is not None and owner.proc.poll() is not None:
            return f"ledger exited: {owner.log()}"
        return None

    try:
        wait_for_consumer(url, queue, timeout_s=timeout_s, gone=gone)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {owner.log()}") from None


@pytest.fixture
def ledger_service(vhost_url: str, tmp_path: Path) -> Iterator[LedgerProcess]:
    """A not yet started ``dispatch ledger`` on this test's vhost and a SQLite file."""
    service = LedgerProcess(vhost_url, f"sqlite:///{tmp_path / 'ledger.db'}",
                            tmp_path / "ledger.log")
    yield service
    service.stop()


class Wire:
    """A raw channel on this test's vhost: publish events, watch queues."""

    def __init__(self, url: str) -> None:
        self.conn = amqp.Connection(**_amqp_params(url))
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.confirm_select()

    def publish_event(self, body: dict[str, Any], *, raw: bytes | None = None,
                      content_type: str = events.CONTENT_TYPE) -> None:
        """Publish an event as a node does (claims to the ledger's queue), with a confirm."""
        self.channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                                      auto_delete=False)
        subject = body.get("pool") if "job_id" in body else body.get("node")
        msg = amqp.Message(raw if raw is not None else events.encode(body),
                           content_type=content_type, delivery_mode=2,
                           message_id=events.event_id(body) if raw is None else "bad")
        if body.get("event") == events.Event.CLAIMED.value:  # claims go to the ledger itself
            self.channel.basic_publish(msg, "", routing_key=topology.ledger_queue())
        else:
            self.channel.basic_publish(msg, topology.events_exchange(),
                                       routing_key=f"{body.get('event')}.{subject}")

    def tap(self, exchange: str, key: str, kind: str = "topic") -> str:
        """Declare a private queue bound to ``exchange`` with ``key``; return its name."""
        name = f"tap-{uuid.uuid4().hex[:8]}"
        self.channel.exchange_declare(exchange, kind, durable=True, auto_delete=False)
        self.channel.queue_declare(name, durable=False, auto_delete=False, exclusive=True)
        self.channel.queue_bind(name, exchange, routing_key=key)
        return name

    def get(self, queue: str, timeout_s: float = 20.0) -> amqp.Message:
        """Return the next message on ``queue`` (acked), waiting for it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.channel.basic_get(queue, no_ack=True)
            if msg is not None:
                return msg
            time.sleep(0.05)
        raise TimeoutError(f"nothing on {queue} within {timeout_s}s")

    def depth(self, queue: str) -> int:
        """Return how many messages wait on ``queue``."""
        _, count, _ = self.channel.queue_declare(queue, passive=True)
        return int(count)

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(Exception):
            self.conn.close()


def _amqp_params(url: str) -> dict[str, Any]:
    info = kombu.Connection(url)
    return {"host": f"{info.hostname}:{info.port}", "userid": info.userid,
            "password": info.password, "virtual_host": info.virtual_host}


@pytest.fixture
def wire(vhost_url: str) -> Iterator[Wire]:
    """A raw AMQP channel on this test's vhost."""
    w = Wire(vhost_url)
    yield w
    w.close()
