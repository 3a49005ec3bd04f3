"""``dispatch flower-feed``: Dispatch's events shown in Flower, at no cost to the nodes.

Execute nodes already publish every lifecycle event to ``dispatch.events``. This
service reads them from its own bounded queue (``dispatch.dashboard``), sends
Celery-format events to Celery's event exchange with ``celery.events.EventDispatcher``
(one sender per node, named ``celery@NODE``), and answers Flower's inspect
broadcasts for the nodes alive (:mod:`workers.dashboard.inspect`). JSON only.

It binds its queue only once the ledger's queue exists: a node treats "my claim was
routed somewhere" as "a ledger keeps my jobs" and acks jobs early, so a feed alone
must not look like a ledger. An event it cannot read is logged and dropped here:
the ledger's queue holds the same event and dead-letters it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import kombu
import kombu.pidbox
from celery import Celery
from celery.events import EventDispatcher

from dispatch import broker, events, schema, topology
from dispatch.errors import DispatchError, InvalidMessageError
from workers.dashboard.events import SHOWN, CeleryEvent, Translator, hostname
from workers.dashboard.inspect import Answers, Pidboxes

log = logging.getLogger(__name__)

PREFETCH = 200
LEDGER_POLL_S = 1.0
_RECOVERABLE: tuple[type[BaseException], ...] = (DispatchError, *broker.CONNECTION_ERRORS)


def celery_app() -> Celery:
    """Return the feed's Celery app: Celery's names and serializers, JSON only."""
    app = Celery("dispatch-flower-feed", set_as_current=False)
    app.conf.update(accept_content=["json"], event_serializer="json", task_serializer="json",
                    result_accept_content=["json"], result_serializer="json")
    return app


def mailbox(app: Celery, conn: kombu.Connection) -> kombu.pidbox.Mailbox:
    """Return Celery's control mailbox as a Celery worker would use it, bound to ``conn``."""
    conf = app.conf
    box = kombu.pidbox.Mailbox(
        conf.control_exchange, type="fanout", accept=["json"], serializer="json",
        queue_ttl=conf.control_queue_ttl, reply_queue_ttl=conf.control_queue_ttl,
        queue_expires=conf.control_queue_expires,
        reply_queue_expires=conf.control_queue_expires, queue_exclusive=False)
    return box(conn)


class Feed:
    """The service loop; :meth:`run` returns when ``stop`` is set."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.app = celery_app()
        self.translator = Translator(version=_version())
        self._senders: dict[str, EventDispatcher] = {}
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._channel: Any = None
        self._pidboxes: Pidboxes | None = None

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, reconnecting after broker failures."""
        while not stop.is_set():
            try:
                with broker.connect(self.broker_url) as conn:
                    if self._wait_for_ledger(conn, stop):
                        self._serve(conn, stop)
            except _RECOVERABLE as exc:
                log.error("flower-feed: %s; starting again in 2 s", exc)
                stop.wait(2.0)
            finally:
                self._senders.clear()
                self._inbox.clear()  # unacked events come back by themselves
                self._channel = None
                if self._pidboxes is not None:
                    self._pidboxes.forget()

    def _wait_for_ledger(self, conn: kombu.Connection, stop: threading.Event) -> bool:
        """Wait until the ledger's queue exists; False when stopped first."""
        said = False
        while not stop.is_set():
            if broker.queue_exists(conn, topology.ledger_queue()):
                return True
            if not said:
                log.warning("flower-feed: waiting for the ledger's queue %s (run dispatch "
                            "ledger): nodes send per-job events only while a ledger keeps "
                            "them", topology.ledger_queue())
                said = True
            stop.wait(LEDGER_POLL_S)
            conn.heartbeat_check()
        return False

    def _serve(self, conn: kombu.Connection, stop: threading.Event) -> None:
        channel = self._channel = conn.default_channel
        with broker.translated("declaring the dashboard queue"):
            _declare(channel)
        answers = Answers(self.translator.book, _broker_info(conn))
        self._pidboxes = Pidboxes(mailbox(self.app, conn), channel, answers, self._inbox.append)
        broker.consumer(channel, [topology.dashboard_queue()], accept=[events.CONTENT_TYPE],
                        on_message=lambda m: self._inbox.append(lambda: self._on_event(m))
                        ).consume()
        self._pidboxes.sync({n.name for n in self.translator.book.alive()})
        log.info("flower-feed: showing events from %s in Flower", broker.safe_url(self.broker_url))
        while not stop.is_set():
            self._fill(conn)
            while self._inbox:  # what arrives meanwhile (py-amqp reads while publishing) too
                self._inbox.popleft()()
            self._send(self.translator.expire(time.time()))
            conn.heartbeat_check()

    def _fill(self, conn: kombu.Connection) -> None:
        """Take deliveries until none is ready or a prefetch's worth waits.

        Callbacks only queue work: handling a delivery publishes, and publishing from
        inside ``drain_events`` would read (and handle) further deliveries re-entrantly.
        """
        timeout = 1.0
        while len(self._inbox) < PREFETCH:
            try:
                conn.drain_events(timeout=timeout)
            except TimeoutError:
                return
            timeout = 0.01

    def _on_event(self, message: Any) -> None:
        try:
            body = _event_body(message)
        except InvalidMessageError as exc:
            log.warning("flower-feed: dropping an unreadable event (the ledger dead-letters "
                        "its copy): %s", exc.reason)
            message.ack()
            return
        try:
            found = self.translator.translate(body, time.time())
        except (TypeError, ValueError, KeyError, AttributeError):  # one odd event, not a wedge
            log.exception("flower-feed: cannot show event %s; dropping it", body.get("event"))
            message.ack()
            return
        log.debug("flower-feed: %s %s -> %s", body.get("job_id") or body.get("node"),
                  body.get("event"), [e.type for e in found])
        self._send(found)
        message.ack()

    def _send(self, found: list[CeleryEvent]) -> None:
        for event in found:
            self._sender(event.hostname).send(event.type, **event.fields)
        if found and self._pidboxes is not None:
            self._pidboxes.sync({n.name for n in self.translator.book.alive()})
        if len(self._senders) > len(self.translator.book.nodes):  # some were forgotten
            known = {hostname(n) for n in self.translator.book.nodes}
            for name in set(self._senders) - known:
                del self._senders[name]

    def _sender(self, name: str) -> EventDispatcher:
        sender = self._senders.get(name)
        if sender is None:
            sender = EventDispatcher(channel=self._channel, hostname=name, app=self.app,
                                     buffer_while_offline=False)
            self._senders[name] = sender
        return sender


def _declare(channel: Any) -> None:
    channel.basic_qos(0, PREFETCH, False)
    channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                             auto_delete=False)
    queue = topology.dashboard_queue()
    channel.queue_declare(queue, durable=True, auto_delete=False,
                          arguments=topology.dashboard_queue_arguments())
    for event in SHOWN:
        channel.queue_bind(queue, topology.events_exchange(),
                           routing_key=events.routing_key(event, "#"))


def _event_body(message: Any) -> dict[str, Any]:
    if message.content_type not in (events.CONTENT_TYPE, None, ""):
        raise InvalidMessageError(f"is {message.content_type!r}, not {events.CONTENT_TYPE}",
                                  field="content_type")
    body = events.decode(message.body)
    schema.validate(schema.EVENT, body, InvalidMessageError)
    return body


def _broker_info(conn: kombu.Connection) -> dict[str, Any]:
    """Return what Flower's worker page shows of the broker (never the password)."""
    # A transport given as a class (Dispatch's buffered one) is named as its URL names it.
    transport = conn.transport_cls
    name = transport if isinstance(transport, str) else conn.transport.driver_type
    return {"transport": name, "hostname": conn.hostname, "port": conn.port,
            "virtual_host": conn.virtual_host, "userid": conn.userid,
            "heartbeat": conn.heartbeat, "ssl": bool(conn.ssl)}


def _version() -> str:
    try:
        return version("dispatch")
    except PackageNotFoundError:
        return "0"
