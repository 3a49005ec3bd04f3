"""The Python client: submit jobs with confirms, follow their replies, fetch results.

One connection and one channel per client, guarded by a lock, so a client may be
shared by threads (or live inside a Celery task). Replies arrive on the client's
own durable queue ``dispatch.reply.<client-id>``; a reply is acked only once it has
been handed to the caller, so results survive a client that goes away. A ``Running``
reply (advisory, not written to disk) is acked together with the final reply that
follows it, in one ``multiple`` ack, or within ``ACK_DEFER_S`` when none follows soon.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import kombu

from dispatch import broker, headers, submitting, topology
from dispatch.chunks import ChunkError, Gatherer
from dispatch.errors import BrokerUnreachableError, InvalidMessageError
from dispatch.handle import JobHandle
from dispatch.job import ArrayPlace, JobSpec, JobUpdate
from dispatch.result import JobResult

log = logging.getLogger(__name__)

ACCEPT = ["application/zip", "application/octet-stream"]
_POLL_S = 0.2
#: Longest a handed-out advisory reply waits for its ack to ride with a final's.
ACK_DEFER_S = 0.5
_ATTEMPTS_KEPT = 100_000
#: What a publish raises when the connection is gone (broker.translated turns the
#: library's errors into BrokerUnreachableError).
_CONNECTION_LOST: tuple[type[BaseException], ...] = (BrokerUnreachableError,
                                                    *broker.CONNECTION_ERRORS)


class Client:
    """A connection to Dispatch: ``submit`` jobs, then ``wait`` or follow ``updates``."""

    def __init__(self, broker_url: str, *, client_id: str | None = None,
                 heartbeat_s: int = broker.DEFAULT_HEARTBEAT_S,
                 chunk_dir: Path | None = None, queue_type: str | None = None) -> None:
        self.broker_url = broker_url
        #: classic or quorum (``DISPATCH_QUEUE_TYPE`` unless given): on quorum queues a
        #: job goes to its priority level's exchange.
        self.queue_type = broker.queue_type_in_use(queue_type)
        self.client_id = topology.check_client_id(client_id or uuid.uuid4().hex[:16])
        self.reply_queue = topology.reply_queue(self.client_id)
        #: Where chunks of large results are gathered (one file per job attempt); a client
        #: started again with the same id carries on with the files it finds there.
        self.chunks = Gatherer(chunk_dir or Path(tempfile.gettempdir())
                               / f"dispatch-chunks-{os.getuid()}-{self.client_id}")
        self._refused: dict[int, ChunkError] = {}
        self._parts: dict[int, tuple[str, int]] = {}
        self._heartbeat_s = heartbeat_s
        self._lock = threading.RLock()
        self._inbox: collections.deque[tuple[JobUpdate, int]] = collections.deque()
        self._returned: set[str] = set()  # job ids the broker could not route
        #: The latest attempt seen, per job sent out again (absent: attempt 1).
        self._attempts: dict[str, int] = {}
        #: The attempt whose final reply this client handed out, per job.
        self._finished: dict[str, int] = {}
        #: Handed-out advisory replies whose ack waits for the next final's, and since when.
        self._deferred: list[int] = []
        self._deferred_since = 0.0
        #: Deliveries kept unacked on purpose (a chunk that could not be stored).
        self._held: set[int] = set()
        self._conn: kombu.Connection | None = None
        self._away = False  # the broker was unreachable at the last try
        self._connect()

    # -- connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        conn = broker.connect(self.broker_url, heartbeat_s=self._heartbeat_s)
        try:
            self._set_up(conn)
        except BaseException:
            broker.release_quietly(conn)
            raise
        self._conn = conn
        self._inbox.clear()  # unacked deliveries of a dead channel come back by themselves
        self._deferred.clear()
        self._held.clear()
        self._refused.clear()
        self._parts.clear()

    def _set_up(self, conn: kombu.Connection) -> None:
        self.user = str(conn.userid)
        with broker.translated("declaring the reply queue"):
            channel = conn.default_channel
            broker.declare_jobs_exchanges(channel, self.queue_type)
            broker.declare_reply_queue(channel, self.client_id, self.queue_type)
            self._confirms = broker.Confirms(channel, on_return=self._on_return)
            self._consumer = broker.consumer(channel, [self.reply_queue], accept=ACCEPT,
                                             on_message=self._on_reply)
            self._consumer.consume()

    def _reconnect(self) -> None:
        log.warning("client %s: connection lost; reconnecting", self.client_id)
        self._release()
        self._connect()

    def _release(self) -> None:
        broker.release_quietly(self._conn)
        self._conn = None

    def close(self) -> None:
        """Close the connection; replies not yet taken stay queued for next time."""
        with self._lock:
            self._flush_acks()
            self._release()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ---------------------------------------------------------------------

    def submit_array(self, spec: JobSpec, count: int) -> list[JobHandle]:
        """Submit ``count`` copies of ``spec`` as one array; job ids are ``ARRAYID.INDEX``.

        Each job sees its place in ``DISPATCH_ARRAY_ID`` / ``DISPATCH_ARRAY_INDEX``.
        """
        if count < 1:
            raise ValueError("an array has at least one job")
        array_id = spec.job_id or uuid.uuid4().hex
        return self.submit_many(replace(spec, job_id=f"{array_id}.{index}",
                                        array=ArrayPlace(array_id, index, count))
                                for index in range(count))

    def submit(self, spec: JobSpec) -> JobHandle:
        """Publish one job with confirms and mandatory routing; return its handle.

        Raises UnroutableError when no queue is bound for the job's pool (no worker
        ever served it), and BrokerError when the broker does not take the job.
        """
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[JobSpec]) -> list[JobHandle]:
        """Submit several jobs as :meth:`submit` does, their confirms awaited together.

        Jobs go out in windows of ``submitting.WINDOW``: one round trip to the broker
        a window, not one a job. A window whose connection is lost is published again
        once, after a reconnect (at least once). On an error, the windows before it
        stay submitted.
        """
        requests = [submitting.request(spec, reply_to=self.reply_queue, user=self.user,
                                       queue_type=self.queue_type) for spec in specs]
        done, retried = 0, False
        while done < len(requests):
            window = requests[done:done + submitting.WINDOW]
            try:
                with self._lock:
                    submitting.publish_batch(self._confirms, self._returned, window)
            except _CONNECTION_LOST:
                if retried:  # a window in doubt is published again: at least once
                    raise
                retried = True
                self._reconnect()
                continue
            done, retried = done + len(window), False
        return [JobHandle(self, r.job_id) for r in requests]

    def _on_return(self, msg: Any, detail: str) -> None:
        self._returned.add(str(msg.properties.get("message_id")))

    def attach(self, job_id: str) -> JobHandle:
        """Return a handle for a job submitted earlier under this client id."""
        return JobHandle(self, job_id)

    # -- replies ------------------------------------------------------------------------

    def _on_reply(self, message: Any) -> None:
        raw = message.headers or {}
        if headers.RESULT_CHUNK in raw:
            self._on_chunk(message)
            return
        try:
            update = headers.decode_reply(raw, message.body)
        except InvalidMessageError as exc:
            log.warning("client %s: dropping a message that is not a reply: %s",
                        self.client_id, exc.reason)
            message.channel.basic_ack(message.delivery_tag)
            return
        if self._stale(update):  # replies arrive in order: judge each as it comes
            if headers.RESULT_BYTES in update.headers:
                self.chunks.discard(update.job_id, update.attempt)
            message.channel.basic_ack(message.delivery_tag)
            return
        if headers.RESULT_BYTES in update.headers:
            self._parts[message.delivery_tag] = (update.job_id, update.attempt)
            try:
                update = self.chunks.finish(update)
            except ChunkError as exc:  # taking this reply raises it
                log.error("%s", exc)
                self._refused[message.delivery_tag] = exc
        self._inbox.append((update, message.delivery_tag))

    def _on_chunk(self, message: Any) -> None:
        """Store a chunk of a large result, then ack it (see ``dispatch.chunks``).

        Chunks are acked once stored, for the broker's consumer_timeout would close a
        channel holding them all; the final reply is acked when handed out, as any reply.
        """
        try:
            self.chunks.add(message.headers or {}, message.body, self._attempts)
        except ChunkError as exc:
            log.warning("client %s: dropping %s", self.client_id, exc)
        except OSError as exc:  # left unacked: it comes back after a reconnect
            log.error("client %s: cannot store a result chunk: %s", self.client_id, exc)
            self._held.add(message.delivery_tag)
            return
        message.channel.basic_ack(message.delivery_tag)

    def next_update(self, job_ids: Iterable[str] | None = None,
                    timeout_s: float | None = None, *,
                    before_ack: Callable[[JobUpdate], None] | None = None) -> JobUpdate | None:
        """Take the next reply for one of ``job_ids`` (any job when None), acking it.

        Returns None when ``timeout_s`` passes first. Replies for other jobs stay
        queued for whoever asks for them. ``before_ack(update)`` runs before the ack
        (to save a result first); if it raises, the reply stays queued.
        """
        wanted = None if job_ids is None else set(job_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = self._take(wanted, before_ack)
                if found is not None:
                    return found
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._pump(_POLL_S if left is None else min(left, _POLL_S))

    def _take(self, wanted: set[str] | None,
              before_ack: Callable[[JobUpdate], None] | None) -> JobUpdate | None:
        while True:
            found = next(((i, update, tag) for i, (update, tag) in enumerate(self._inbox)
                          if wanted is None or update.job_id in wanted), None)
            if found is None:
                return None
            i, update, tag = found
            if self._after_final(update):
                del self._inbox[i]
                self._ack(tag)
                continue
            refused = self._refused.get(tag)
            if before_ack is not None and refused is None:
                before_ack(update)
            del self._inbox[i]
            self._ack(tag, defer=refused is None and not update.is_final)
            if refused is not None:
                raise refused
            if update.is_final:
                self._finished[update.job_id] = update.attempt
                if len(self._finished) > _ATTEMPTS_KEPT:
                    self._finished.pop(next(iter(self._finished)))
            return update

    def _after_final(self, update: JobUpdate) -> bool:
        """Tell whether a reply belongs to an attempt whose final was already handed out.

        Without a ledger a job is at-least-once: a broker restart gives a running job
        back to the queue and another node may run it too. Its second final (and the
        replies before it) are dropped here, so the caller sees one final result.
        """
        done = self._finished.get(update.job_id)
        if done is None or update.attempt > done:
            return False
        log.warning("job %s: dropping a %s reply of attempt %d from %s: its final was "
                    "already handed out", update.job_id, update.state.value, update.attempt,
                    update.host)
        return True

    def _ack(self, tag: int, *, defer: bool = False) -> None:
        """Ack a reply taken; the chunks of a large result are then removed.

        With ``defer`` (an advisory reply) the ack waits to go with the next one: a
        final's ack then covers both (``multiple``) when no delivery below it is still
        unacked. When the connection is gone the reply comes back after the reconnect:
        a final is then dropped as already handed out (:meth:`_after_final`).
        """
        if self._conn is None:  # the channel died and the reply comes back
            return
        if defer:
            if not self._deferred:
                self._deferred_since = time.monotonic()
            self._deferred.append(tag)
            return
        # Deliveries arrive in tag order, so the inbox's first is its lowest.
        multiple = bool(self._deferred) and (not self._inbox or self._inbox[0][1] > tag) \
            and not any(held < tag for held in self._held)
        try:
            self._conn.default_channel.basic_ack(tag, multiple=multiple)
        except broker.CONNECTION_ERRORS:
            log.warning("client %s: connection lost while acking a reply; reconnecting",
                        self.client_id)
            self._release()  # the next pump connects again
            return
        if multiple:
            self._deferred = [t for t in self._deferred if t > tag]
        self._refused.pop(tag, None)
        part = self._parts.pop(tag, None)
        if part is not None:
            self.chunks.discard(*part)

    def _flush_acks(self, older_than_s: float = 0.0) -> None:
        """Ack the deferred advisory replies, if they have waited ``older_than_s``."""
        if not self._deferred or self._conn is None:
            return
        if time.monotonic() - self._deferred_since < older_than_s:
            return
        tags, self._deferred = self._deferred, []
        try:
            for tag in tags:
                self._conn.default_channel.basic_ack(tag)
        except broker.CONNECTION_ERRORS:
            log.warning("client %s: connection lost while acking a reply; reconnecting",
                        self.client_id)
            self._release()

    def _stale(self, update: JobUpdate) -> bool:
        """Tell whether a reply comes from an attempt the ledger has given up on.

        When a lease expires the ledger sends the job out again and tells the client
        (an ``Idle`` reply with the new attempt); replies of older attempts that still
        arrive are dropped, so each job has exactly one final result.
        """
        current = self._attempts.get(update.job_id, 1)
        if update.attempt < current:
            log.info("job %s: dropping a reply of stale attempt %d (now %d)", update.job_id,
                     update.attempt, current)
            return True
        if update.attempt > 1:  # first attempts (nearly every job) need no entry
            self._attempts[update.job_id] = update.attempt
            if len(self._attempts) > _ATTEMPTS_KEPT:
                self._attempts.pop(next(iter(self._attempts)))
        return False

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies; ride out a broker that is away."""
        self._flush_acks(ACK_DEFER_S)
        if self._conn is None and not self._try_connect(timeout_s):
            return
        conn = self._conn
        if conn is None:  # pragma: no cover - _try_connect sets it when it succeeds
            return
        try:
            conn.drain_events(timeout=timeout_s)
        except TimeoutError:
            pass
        except broker.CONNECTION_ERRORS:
            self._lost()
            return
        try:
            conn.heartbeat_check()
        except broker.CONNECTION_ERRORS:
            self._lost()

    def _lost(self) -> None:
        log.warning("client %s: connection lost; reconnecting", self.client_id)
        self._release()
        self._try_connect(0.0)

    def _try_connect(self, pause_s: float) -> bool:
        """Connect again; if the broker is still away, pause and return False.

        A client waiting for results keeps waiting while the broker restarts (its
        replies wait in the durable reply queue): the wait's own timeout bounds it.
        """
        try:
            self._connect()
        except BrokerUnreachableError as exc:
            if not self._away:
                log.warning("client %s: %s; waiting for the broker", self.client_id, exc)
            self._away = True
            time.sleep(pause_s)
            return False
        if self._away:
            log.warning("client %s: broker reachable again", self.client_id)
        self._away = False
        return True


__all__ = ["Client", "JobHandle", "JobResult"]
