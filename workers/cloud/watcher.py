"""The cloud plane's ear for multi-node jobs: it reads their events and boots or deletes
their servers (:mod:`workers.cloud.gangs`).

One durable queue (``DISPATCH_CLOUD_GANG_QUEUE``), single active consumer, bound to the
events exchange with ``job.gathering``, ``job.exited``, ``job.removed`` and
``job.rejected`` of each pool in ``DISPATCH_CLOUD_POOLS``: events wait there while the
watcher is away, and one watcher at a time handles them, in order, so a job's end is
never handled before the gathering that preceded it. Each event is acked once handled;
an unreadable one is dead-lettered. A gathering whose head fell silent for
``DISPATCH_CLOUD_GANG_SILENCE`` (no event while it waits) loses its servers too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import kombu

from dispatch import broker, events, topology
from dispatch.errors import DispatchError, InvalidMessageError
from dispatch.events import Event
from workers.cloud import gangs, lock, metadata, provisioner, scaler
from workers.cloud.errors import CloudError, LockBusyError
from workers.cloud.servers import Cloud, Server
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)
ENDS = (Event.EXITED, Event.REMOVED, Event.REJECTED)
PREFETCH = 20
#: Jobs whose end was handled, remembered so a late gathering event boots nothing.
ENDED_KEPT = 10_000
_RECOVERABLE: tuple[type[BaseException], ...] = (DispatchError, *broker.CONNECTION_ERRORS)


def bindings(pools: tuple[str, ...]) -> list[str]:
    """Return the routing keys the watcher's queue is bound with."""
    return [events.routing_key(e, p) for p in pools for e in (Event.GATHERING, *ENDS)]


class GangWatcher:
    """Consumes multi-node job events and keeps each job's servers in step with it."""

    def __init__(self, settings: CloudSettings, *,
                 connect: Callable[[], Cloud] | None = None,
                 bootstrap: Callable[[Server], None] | None = None) -> None:
        self.settings = settings
        self._connect = connect or (lambda: Cloud.connect(settings.require_clouds_yaml(),
                                                          settings.cloud))
        self._bootstrap = bootstrap
        self._inbox: deque[Any] = deque()
        #: Gathering jobs by id: (attempt, monotonic time of their last event, started).
        self.gathering: dict[str, tuple[int, float, bool]] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.handled = 0
        self.ready = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, starting again after broker or cloud failures."""
        while not stop.is_set():
            try:
                self._recall()
                with broker.connect(self.settings.broker_url) as conn:
                    self._serve(conn, stop)
            except _RECOVERABLE as exc:
                log.error("gang watcher: %s; starting again in 5 s", exc)
                self._inbox.clear()  # unacked deliveries come back by themselves
                stop.wait(5.0)

    def _recall(self) -> None:
        """Learn from the cloud which jobs have servers (after a restart, too)."""
        with self._connect() as cloud:
            for server in cloud.servers():
                job = server.metadata.get(metadata.GANG)
                if job and job not in self.gathering:
                    started = bool(server.metadata.get(metadata.GANG_STARTED_AT))
                    self.gathering[job] = (0, time.monotonic(), started)

    def _serve(self, conn: kombu.Connection, stop: threading.Event) -> None:
        channel = conn.default_channel
        queue = self.settings.gang_queue
        with broker.translated("declaring the gang watcher's queue"):
            broker.declare_dead_letter(channel)
            channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                                     auto_delete=False)
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments={
                "x-queue-type": "classic", "x-single-active-consumer": True,
                "x-dead-letter-exchange": topology.dead_letter_exchange()})
            for key in bindings(self.settings.pools):
                channel.queue_bind(queue, topology.events_exchange(), routing_key=key)
            channel.basic_qos(0, PREFETCH, False)
            broker.consumer(channel, [queue], accept=[events.CONTENT_TYPE],
                            on_message=self._inbox.append).consume()
        log.info("gang watcher: reading %s for pools %s", queue, ", ".join(self.settings.pools))
        self.ready.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1.0)
            while self._inbox and not stop.is_set():
                self._handle(self._inbox.popleft())
            self._sweep()
            conn.heartbeat_check()

    def _handle(self, message: Any) -> None:
        try:
            body = events.decode(broker.raw_body(message))
        except InvalidMessageError as exc:
            log.warning("gang watcher: dead-lettering an unreadable event: %s", exc)
            message.reject(requeue=False)
            self.handled += 1
            return
        try:
            if body.get("pool") in self.settings.pools:
                self._on_event(body)
        except InvalidMessageError as exc:
            log.warning("gang watcher: job %s: dead-lettering a bad %s event: %s",
                        body.get("job_id"), body.get("event"), exc)
            message.reject(requeue=False)
        except CloudError as exc:
            log.error("gang watcher: job %s: %s; trying again in 5 s", body.get("job_id"), exc)
            time.sleep(5.0)
            message.requeue()
        else:
            message.ack()
        self.handled += 1

    def _on_event(self, body: dict[str, Any]) -> None:
        event, job = body.get("event"), body.get("job_id")
        if event == Event.GATHERING.value:
            self._on_gathering(gangs.Gathering.from_event(body), int(body.get("attempt") or 1))
        elif event in ENDS and isinstance(job, str) and job in self.gathering:
            self._release(job, f"the job's {event} event")

    def _on_gathering(self, gathering: gangs.Gathering, attempt: int) -> None:
        job = gathering.job_id
        if job in self.ended:
            log.info("job %s: gathering event after its end; ignored", job)
            return
        known_attempt, _, started = self.gathering.get(job, (attempt, 0.0, False))
        started = gathering.started or (started and attempt <= known_attempt)
        self.gathering[job] = (max(attempt, known_attempt), time.monotonic(), started)
        with self._connect() as cloud:
            gangs.note(cloud, gathering)
            if started:
                return
            for server in self._provision(cloud, gathering):
                if self.settings.ssh_key is None:
                    continue
                if self._bootstrap is not None:
                    self._bootstrap(server)
                else:
                    provisioner.bootstrap_server(cloud, self.settings, server)

    def _provision(self, cloud: Cloud, gathering: gangs.Gathering) -> list[Server]:
        unclaimed = scaler.queue_depth(self.settings.broker_url, gathering.pool)
        if unclaimed == 0:
            return []
        try:
            with lock.held(self.settings.broker_url, lock.PROVISION):
                return gangs.provision(cloud, self.settings, gathering, unclaimed)
        except LockBusyError:
            log.info("job %s: another run holds the provision lock; the head's next "
                     "event tries again", gathering.job_id)
            return []

    def _release(self, job: str, why: str) -> None:
        with self._connect() as cloud:
            gangs.release(cloud, job, why)
        self.gathering.pop(job, None)
        self.ended[job] = None
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    def _sweep(self) -> None:
        """Release gathering jobs whose head fell silent."""
        now = time.monotonic()
        silent = [job for job, (_, seen, started) in self.gathering.items()
                  if not started and now - seen >= self.settings.gang_silence_s]
        for job in silent:
            try:
                self._release(job, f"no word from its head for "
                              f"{datetime.timedelta(seconds=self.settings.gang_silence_s)}")
            except CloudError as exc:
                log.error("gang watcher: job %s: %s; trying again later", job, exc)
