"""``dispatch ledger``: the service that turns events into ledger rows.

One connection, one channel. It consumes three queues:

- ``dispatch.ledger`` (bound to ``dispatch.events`` with ``#``): every event;
- ``dispatch.ledger.submitted`` (bound to ``dispatch.jobs`` with each tracked pool's
  key): a copy of every job message, so a queued job is in the ledger as ``Idle``;
- ``dispatch.ledger.control``: users' rm/hold/release requests.

It works in batches: take what is ready (up to ``batch_max``), apply it in one
transaction, publish what follows from it (broadcasts, answers) with confirms, then
ack everything with one ``multiple`` ack. An unreadable message is logged and
dead-lettered. Between batches, once the queues are drained, expired leases are handled, and with a
pools file the waiting jobs of pools with no live node are rerouted to their fallbacks
(:mod:`dispatch.ledger.reroute`).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kombu

from dispatch import broker, events, headers, topology
from dispatch.errors import DispatchError, InvalidMessageError, LedgerError
from dispatch.ledger import control
from dispatch.ledger.fallback import save_policies
from dispatch.ledger.leases import expire_leases
from dispatch.ledger.notify import Notifier
from dispatch.ledger.publisher import AmqpPublisher
from dispatch.ledger.reroute import Rerouter
from dispatch.ledger.store import BatchResult, Ledger, check_event, is_bad_data, utcnow
from dispatch.pools import PoolPolicy
from dispatch.quantity import format_duration

log = logging.getLogger(__name__)

EVENT, SUBMITTED, CONTROL = "event", "submitted", "control"
_RECOVERABLE: tuple[type[BaseException], ...] = (DispatchError, *broker.CONNECTION_ERRORS)


@dataclass(frozen=True)
class ServiceSettings:
    """How ``dispatch ledger`` runs."""

    broker_url: str
    pools: tuple[str, ...] = ()
    lease_check_s: float = 5.0
    batch_max: int = 1000
    admins: frozenset[str] = frozenset()
    #: How long finished jobs are kept (None: for ever); purged at start, then hourly.
    keep_s: float | None = None
    #: classic or quorum; None: ``DISPATCH_QUEUE_TYPE`` (the same for nodes and clients).
    queue_type: str | None = None
    #: Fallback pools by pool (``--pools``); none: jobs wait for their own pool.
    policies: Mapping[str, PoolPolicy] = field(default_factory=dict)
    #: How often pools with no live node are looked at for jobs to reroute.
    fallback_check_s: float = 1.0


PURGE_EVERY_S = 3600.0
#: How long an idle ledger waits for a message before it looks at its stop flag again.
IDLE_WAIT_S = 0.2
#: How long a busy ledger lets deliveries gather before it reads them all at once.
GATHER_S = 0.02


@dataclass
class _Delivery:
    kind: str
    message: Any


class LedgerService:
    """The consumer loop; :meth:`run` returns when ``stop`` is set."""

    def __init__(self, settings: ServiceSettings, ledger: Ledger,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.notifier = notifier
        self.user = str(kombu.Connection(settings.broker_url).userid or "")
        self.admins = settings.admins | {self.user}
        self.queue_type = broker.queue_type_in_use(settings.queue_type)
        self._inbox: list[_Delivery] = []
        self._pools: set[str] = set()
        self._last_check = 0.0
        self._last_purge: float | None = None
        self._last_fallback = 0.0
        self._rerouter: Rerouter | None = None

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting after broker or database failures."""
        save_policies(self.ledger, self.settings.policies)
        while not stop.is_set():
            try:
                with broker.connect(self.settings.broker_url) as conn:
                    self._serve(conn, stop)
            except _RECOVERABLE as exc:
                log.error("ledger: %s; starting again in 2 s", exc)
                self._inbox.clear()  # unacked deliveries come back by themselves
                stop.wait(2.0)

    def _serve(self, conn: kombu.Connection, stop: threading.Event) -> None:
        channel = conn.default_channel
        with broker.translated("declaring the ledger's queues"):
            self._declare(channel)
            self.publisher = AmqpPublisher(channel, self.user, self.queue_type)
            self._pools = set()
            self._track_pools(channel, {*self.settings.pools,
                                        *(p for n in self.ledger.nodes() for p in n.pools),
                                        *(p for pol in self.settings.policies.values()
                                          for p in pol.all_pools())})
            # Liveness is trusted only from now: heartbeats were not heard while away.
            self._rerouter = Rerouter(conn.channel(), self.settings.policies, self.user,
                                      self.queue_type) if self.settings.policies else None
            for kind, queue in ((EVENT, topology.ledger_queue()),
                                (SUBMITTED, topology.ledger_submitted_queue()),
                                (CONTROL, topology.ledger_control_queue())):
                broker.consumer(channel, [queue], accept=[events.CONTENT_TYPE],
                                on_message=self._collector(kind)).consume()
            # Nodes that found no ledger skip per-job events: tell them one listens now.
            self.publisher.broadcast({"op": events.ControlOp.SYNC.value,
                                      "reason": "ledger started", "by": self.user,
                                      "at": events.now()})
            self.publisher.flush()
        log.info("ledger: consuming events as %s", self.user)
        while not stop.is_set():
            drained = self._fill(conn)
            if self._inbox:
                self._process(channel)
            if (drained and self.settings.lease_check_s
                    and time.monotonic() - self._last_check >= self.settings.lease_check_s):
                self._last_check = time.monotonic()
                handled = expire_leases(self.ledger, self.publisher, utcnow())
                if handled:
                    log.info("ledger: %d expired lease(s) handled", len(handled))
            if drained:
                self._purge()
                self._reroute()
            conn.heartbeat_check()

    def _reroute(self) -> None:
        """Move due jobs of pools with no live node to their fallbacks, every so often."""
        if (self._rerouter is None
                or time.monotonic() - self._last_fallback < self.settings.fallback_check_s):
            return
        self._last_fallback = time.monotonic()
        moved = self._rerouter.check(self.ledger, utcnow())
        if moved:
            log.info("ledger: %d job(s) rerouted to a fallback pool", moved)

    def _purge(self) -> None:
        """Forget jobs finished longer ago than ``keep_s``: at start, then hourly."""
        keep_s = self.settings.keep_s
        now = time.monotonic()
        if keep_s is None or (self._last_purge is not None
                              and now - self._last_purge < PURGE_EVERY_S):
            return
        self._last_purge = now
        removed = self.ledger.purge(utcnow() - datetime.timedelta(seconds=keep_s))
        if removed:
            log.info("ledger: forgot %d job(s) finished more than %s ago", removed,
                     format_duration(keep_s))

    def _declare(self, channel: Any) -> None:
        channel.basic_qos(0, self.settings.batch_max, False)
        broker.declare_dead_letter(channel, self.queue_type)
        for exchange in (topology.events_exchange(), topology.control_exchange()):
            channel.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
        broker.declare_jobs_exchanges(channel, self.queue_type)
        args = topology.ledger_queue_arguments(self.queue_type)
        for queue in (topology.ledger_queue(), topology.ledger_submitted_queue(),
                      topology.ledger_control_queue()):
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments=args)
        # Claims reach the ledger's queue directly; every other event by these bindings
        # (an older ledger bound "#": undo it, or claims would arrive twice).
        channel.queue_unbind(topology.ledger_queue(), topology.events_exchange(), routing_key="#")
        for key in events.ledger_bindings():
            channel.queue_bind(topology.ledger_queue(), topology.events_exchange(),
                               routing_key=key)

    def _track_pools(self, channel: Any, pools: set[str]) -> None:
        """Make sure each pool has its queue and the ledger sees its submissions."""
        for pool in sorted(pools - self._pools):
            try:
                levels = broker.declare_pool_queues(channel, pool, self.queue_type)
            except ValueError:
                log.warning("ledger: ignoring invalid pool name %r", pool)
                continue
            for level, _ in levels:  # on quorum queues, each priority level's exchange
                channel.queue_bind(topology.ledger_submitted_queue(),
                                   topology.jobs_exchange(level), routing_key=pool)
            self._pools.add(pool)
            log.info("ledger: tracking pool %s", pool)

    def _collector(self, kind: str) -> Callable[[Any], None]:
        def collect(message: Any) -> None:
            self._inbox.append(_Delivery(kind, message))
        return collect

    def _fill(self, conn: kombu.Connection) -> bool:
        """Take deliveries until none is ready or the batch is full; True when drained.

        Once the first delivery is in, what follows is gathered a window at a time:
        everything that arrived during ``GATHER_S`` is read at once, so a busy stream
        wakes the ledger some 50 times a second instead of once a message (each wake-up
        taking a core from the nodes and the broker on a small machine). A window that
        brings nothing ends the batch.
        """
        if not self._inbox:
            try:
                conn.drain_events(timeout=IDLE_WAIT_S)
            except TimeoutError:
                return True
        while len(self._inbox) < self.settings.batch_max:
            time.sleep(GATHER_S)
            before = len(self._inbox)
            while len(self._inbox) < self.settings.batch_max:
                try:
                    conn.drain_events(timeout=0)
                except TimeoutError:
                    break
            if len(self._inbox) == before:
                return True
        return False

    def _process(self, channel: Any) -> None:
        batch, self._inbox = self._inbox, []
        rejected: set[int] = set()
        now = utcnow()
        bodies, subs, controls, pools = self._read(channel, batch, now, rejected)
        result = self._apply(channel, bodies, subs, rejected)
        if result.effects.rebroadcasts:
            control.rebroadcast(self.publisher, result.effects.rebroadcasts, now)
        for msg, body in controls:
            try:
                self._control(channel, msg, body, now)
            except Exception as exc:
                _reraise_unless_bad_data(exc, channel)
                self._reject(channel, msg, CONTROL, exc, rejected)
        self.publisher.flush()
        tags = [i.message.delivery_tag for i in batch if i.message.delivery_tag not in rejected]
        if tags:
            channel.basic_ack(max(tags), multiple=True)
        self._track_pools(channel, pools)
        if self.notifier is not None and result.effects.changes:
            self.notifier.notify(self.ledger, result.effects.changes)

    def _read(self, channel: Any, batch: list[_Delivery], now: datetime.datetime,
              rejected: set[int]) -> tuple[list[tuple[Any, dict[str, Any]]],
                                           list[tuple[Any, dict[str, Any]]],
                                           list[tuple[Any, dict[str, Any]]], set[str]]:
        """Decode a batch into events, submissions and control requests; reject the rest."""
        bodies: list[tuple[Any, dict[str, Any]]] = []
        subs: list[tuple[Any, dict[str, Any]]] = []
        controls: list[tuple[Any, dict[str, Any]]] = []
        pools: set[str] = set()
        for item in batch:
            msg = item.message
            try:
                if item.kind == EVENT:
                    body = _event_body(msg)
                    bodies.append((msg, body))
                    if body["event"] == events.Event.HEARTBEAT.value:
                        pools.update(str(p) for p in body.get("pools") or ())
                elif item.kind == SUBMITTED:
                    sub = _submission(msg, now)
                    if sub is not None:
                        subs.append((msg, sub))
                else:
                    controls.append((msg, events.decode(broker.raw_body(msg), what="control")))
            except Exception as exc:  # one unreadable message must not stop the ledger
                _reraise_unless_bad_data(exc, channel)
                self._reject(channel, msg, item.kind, exc, rejected)
        return bodies, subs, controls, pools

    def _apply(self, channel: Any, bodies: list[tuple[Any, dict[str, Any]]],
               subs: list[tuple[Any, dict[str, Any]]], rejected: set[int]) -> BatchResult:
        """Apply a batch in one commit; if its data is at fault, message by message."""
        try:
            return self.ledger.apply_batch([b for _, b in bodies], [s for _, s in subs],
                                           checked=True)
        except Exception as exc:
            if not is_bad_data(exc):
                raise
            log.warning("ledger: a batch of %d message(s) failed (%s); applying them one by one",
                        len(bodies) + len(subs), exc)
        result = BatchResult()
        for kind, items in ((SUBMITTED, subs), (EVENT, bodies)):
            for msg, item in items:
                try:
                    one = self.ledger.apply_batch([item] if kind == EVENT else [],
                                                  [item] if kind == SUBMITTED else [],
                                                  checked=True)
                except Exception as exc:
                    if not is_bad_data(exc):
                        raise
                    self._reject(channel, msg, kind, exc, rejected)
                    continue
                result.applied += one.applied
                result.effects.rebroadcasts += one.effects.rebroadcasts
                result.effects.changes += one.effects.changes
        return result

    @staticmethod
    def _reject(channel: Any, msg: Any, kind: str, exc: BaseException,
                rejected: set[int]) -> None:
        """Dead-letter one message (the ledger's queues name the dead-letter exchange)."""
        if isinstance(exc, InvalidMessageError):
            log.warning("ledger: dead-lettering an unreadable %s message: %s", kind, exc.reason)
        else:
            log.exception("ledger: dead-lettering a %s message it cannot take", kind)
        channel.basic_reject(msg.delivery_tag, requeue=False)
        rejected.add(msg.delivery_tag)

    def _control(self, channel: Any, msg: Any, body: dict[str, Any],
                 now: datetime.datetime) -> None:
        reply_to = msg.properties.get("reply_to")
        correlation_id = msg.properties.get("correlation_id")
        try:
            request = control.parse_request(body, msg.properties.get("user_id"))
        except InvalidMessageError as exc:
            log.warning("ledger: refusing a control request: %s", exc.reason)
            if reply_to:
                self.publisher.answer(reply_to, correlation_id, {
                    "op": str(body.get("op")), "ok": False, "error": exc.reason, "results": []})
            return
        outcomes = control.handle(self.ledger, self.publisher, request, admins=self.admins,
                                  now=now)
        if reply_to:
            self.publisher.answer(reply_to, correlation_id,
                                  control.answer(request.op.value, outcomes))


def _reraise_unless_bad_data(exc: BaseException, channel: Any) -> None:
    """Raise ``exc`` again when the broker or the database is away rather than the data bad."""
    if broker.connection_lost(exc, getattr(channel, "connection", None)):
        raise exc
    if isinstance(exc, LedgerError) and not is_bad_data(exc):
        raise exc


def _event_body(message: Any) -> dict[str, Any]:
    if message.content_type not in (events.CONTENT_TYPE, None, ""):
        raise InvalidMessageError(f"is {message.content_type!r}, not {events.CONTENT_TYPE}",
                                  field="content_type")
    body = events.decode(broker.raw_body(message))
    check_event(body)
    return body


def _submission(message: Any, now: datetime.datetime) -> dict[str, Any] | None:
    """Return a captured job message to record, or None for one the ledger itself sent again."""
    raw = message.headers or {}
    if headers.envelope(message.properties, raw).attempt > 1:
        return None
    if not message.properties.get("message_id"):
        return None  # without an id the node invents one; the claim will tell
    request = events.capture_request(message.properties, raw, broker.raw_body(message))
    return {**request, "pool": message.delivery_info.get("routing_key") or "", "at": now}
