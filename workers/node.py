"""The execute node: one connection, one loop, no scheduler in the path.

A single thread waits on three kinds of event with one selector: the broker's
socket (deliveries, publisher confirms, control orders), a pidfd per running job
(exits), the chirp socket and a wake-up pipe (signals). Nothing on the hot path
blocks: replies are published without waiting, and a job message is acked from the
confirm callback of its claim (when a ledger listens) or of its final reply
(at-least-once). Declarations happen once per connection.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from typing import Any

import amqp
import kombu

from dispatch import broker, events, topology
from dispatch.errors import DispatchError, NodeNameInUseError
from workers import announce
from workers.announce import Announcer
from workers.duties import NodeDuties
from workers.nodebase import Active, NodeConfig
from workers.orders import Orders
from workers.replies import Replies

log = logging.getLogger(__name__)

__all__ = ["ExecuteNode", "NodeConfig"]

ACCEPT = ["application/zip", "application/octet-stream", "application/x-msgpack"]
BURST_QUIET_S = 0.3
#: How often a node with running jobs makes sure its job spawner is alive.
SPAWNER_CHECK_S = 0.5


class ExecuteNode(NodeDuties):
    """Consumes job messages, runs them, replies, and acks once the job is safe elsewhere.

    A job is safe once its final reply is confirmed or, when a ledger listens, once its
    claim is: the ledger then holds the request and re-dispatches it should this node's
    heartbeats (the job's lease) stop.
    """


    # -- lifecycle ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT drain the node: stop taking jobs, finish running ones."""
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def run(self) -> None:
        """Serve until stopped, reconnecting with backoff whenever the broker goes away."""
        backoff_s = 0.5
        started = time.monotonic()
        try:
            while True:
                try:
                    self._serve()
                    return
                except broker.CONNECTION_ERRORS as exc:
                    self._drop_connection()
                    if self.stopping and not self.running:
                        return
                    log.warning("broker connection lost (%s); reconnecting in %.1fs", exc,
                                backoff_s)
                except NodeNameInUseError as exc:
                    self._drop_connection()
                    if self.stopping and not self.running:
                        return
                    # At start, another node has the name (or this one's last connection,
                    # not yet timed out): give it a lease's time, then give up. Later it is
                    # this node's own old connection, so keep trying.
                    if not self._held_name and time.monotonic() - started > self.config.lease_s:
                        raise
                    log.error("%s; retrying in %.1fs", exc, backoff_s)
                except DispatchError as exc:  # broker unreachable at (re)connect
                    if self.stopping and not self.running:
                        return
                    log.warning("%s; retrying in %.1fs", exc, backoff_s)
                except Exception:
                    # The last line of defence: a bug outside one message's handling. The
                    # broker takes back every unacked job; running jobs go on and report.
                    log.exception("node %s: unexpected error; reconnecting in %.1fs",
                                  self.machine.name, backoff_s)
                    self._drop_connection()
                    if self.stopping and not self.running:
                        return
                self._idle(backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)
        finally:
            self.chirp.close()
            self.runner.close()

    def _idle(self, seconds: float) -> None:
        """Wait out a reconnect backoff while still enforcing running jobs' time limits."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            self._enforce_limits()

    # -- the loop -----------------------------------------------------------------------

    def _serve(self) -> None:
        conn = broker.connect(self.config.broker_url, heartbeat_s=self.config.heartbeat_s)
        self._conn = conn
        self._hold_name(conn)
        channel = conn.default_channel
        queues = self._declare(channel)
        self._replies_now = Replies(channel, self.machine.name)
        self._announcer = Announcer(self._replies_now.confirms, self.machine.name)
        self._claim_mode = None
        self._gang_reset()
        self._rebind_running()
        self._prefetch_sent = self._prefetch()
        # Quorum queues refuse a channel-wide prefetch: there each consumer has its own.
        channel.basic_qos(0, self._prefetch_sent, broker.prefetch_is_global())
        consumer = broker.consumer(channel, queues, accept=ACCEPT, on_message=self.inbox.append)
        consumer.consume()
        self._consume_orders(conn)
        sock = conn.connection.sock
        # A loop turn's frames (replies, claims, events, acks) go out together, just
        # before the loop waits again (dispatch.transport): one system call, not one each.
        transport = conn.connection.transport
        if hasattr(transport, "hold_writes"):  # not TLS: py-amqp's sends each write at once
            transport.hold_writes()
            self._flush_writes = transport.flush_writes
        self._selector.register(sock, selectors.EVENT_READ, "amqp")
        self._next_heartbeat = 0.0
        log.info("node %s: serving %s with %d slots", self.machine.name, ", ".join(queues),
                 self.machine.cpus)
        try:
            self._loop(conn, consumer)
        finally:
            self._selector.unregister(sock)

    def _hold_name(self, conn: kombu.Connection) -> None:
        """Take this node's name on the broker before anything else; raise if it is taken."""
        name = self.machine.name
        channel = conn.channel()
        try:
            channel.queue_declare(topology.node_name_queue(name), exclusive=True,
                                  auto_delete=False, durable=False)
        except amqp.exceptions.ResourceLocked:
            raise NodeNameInUseError(
                f"another node is connected to the broker as {name!r}; give each node its "
                "own --name") from None
        channel.close()
        self._held_name = True

    def _declare(self, channel: Any) -> list[str]:
        cfg = self.config
        queues = [q for pool in cfg.pools for _, q in broker.declare_pool_queues(channel, pool)]
        broker.declare_dead_letter(channel)
        announce.declare(channel)
        if cfg.queue:
            queues.append(broker.declare_custom(channel, cfg.exchange or "",
                                                cfg.routing_key or cfg.queue, cfg.queue))
        return queues

    def _consume_orders(self, conn: kombu.Connection) -> None:
        """Consume this node's control queue on a channel of its own (jobs never starve it)."""
        userid = conn.userid
        self.orders = self.orders or Orders(self.machine.name, {*self.config.admins, userid})
        channel = conn.channel()
        queue = self.orders.declare(channel)
        channel.basic_qos(0, 64, False)
        broker.consumer(channel, [queue], accept=[events.CONTENT_TYPE],
                        on_message=self.control_inbox.append).consume()

    def _loop(self, conn: kombu.Connection, consumer: kombu.Consumer) -> None:
        cancelled = False
        while True:
            self._flush_writes()
            ready = self._wait_ready()
            if "wake" in ready:
                os.read(self._wake_r, 512)
            if "chirp" in ready:
                self._chirped()  # before reaping: a job's last words come before its exit
            for data in ready:
                if isinstance(data, Active):
                    self._reap(data)
            self._drain(conn)
            conn.heartbeat_check()
            self._enforce_limits()
            self._notices_due(time.monotonic())
            self._poll_without_pidfd()
            self._follow_claim_mode()
            self._gang_tick()
            if self.stopping and not cancelled:
                consumer.cancel()
                cancelled = True
                self._hand_back_waiting()
            while self.control_inbox:
                self._on_control(self.control_inbox.popleft())
            while self.inbox:
                self._receive(self.inbox.popleft())
            if not self.finishing:
                # JobFlow._settled and _ack lower it before each ack; this catches a job
                # that settled without one (claimed while a ledger still listened, or
                # handed back after a refused reply).
                self._update_prefetch()
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
            if self._finished(cancelled):
                self._flush_writes()
                return

    def _wait_ready(self) -> list[Any]:
        """Wait for what the loop serves next; finished jobs' directories go meanwhile.

        Only while nothing is ready: a job or reply that came in goes first.
        """
        if self.runner.untidy:
            ready = self._selector.select(0)
            if ready:
                return [key.data for key, _ in ready]
            self.runner.tidy()
        return [key.data for key, _ in self._selector.select(self._timeout())]

    def _finished(self, cancelled: bool) -> bool:
        idle = (not self.running and not self.gang_holds and not self._gang_deferred
                and not self._replies.confirms.outstanding)
        if cancelled and idle:
            if not self._offline_sent:
                self._offline_sent = True
                self.announcer.offline(self.stop_reason)
                return False
            return True
        if not (self.config.burst and idle and not self.inbox and self._queues_empty()):
            self._empty_since = None
            return False
        # Deliveries already in flight are not counted as ready messages: only a queue
        # seen empty twice, with nothing received in between, is really empty.
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since >= BURST_QUIET_S:
            self.request_stop("burst: queues empty")
        return False

    def _queues_empty(self) -> bool:
        channel = self._channel()
        names = [q for p in self.config.pools
                 for _, q in topology.pool_queues(p, broker.queue_type_in_use())]
        if self.config.queue:
            names.append(self.config.queue)
        for name in names:
            _, count, _ = channel.queue_declare(name, passive=True)
            if count:
                return False
        return True

    def _timeout(self) -> float:
        deadlines = [d for a in self.running.values() if a.job and (d := a.job.next_deadline())]
        deadlines += [d for a in self.running.values()
                      for d in (a.claim_due, a.running_due) if d is not None]
        timeout = 0.1 if self.config.burst else 1.0
        timeout = min(timeout, max(0.0, self._next_heartbeat - time.monotonic()))
        if any(a.job and not a.job.has_pidfd for a in self.running.values()):
            timeout = 0.02
        if deadlines:
            timeout = min(timeout, max(0.0, min(deadlines) - time.monotonic()))
        return timeout

    def _drain(self, conn: kombu.Connection) -> None:
        while True:
            try:
                conn.drain_events(timeout=0)
            except TimeoutError:
                return

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for active in list(self.running.values()):
            if active.job is not None:
                active.job.enforce(now)
        if self.running and now >= self._next_spawner_check:
            self._next_spawner_check = now + SPAWNER_CHECK_S
            self.runner.check_spawner()

    def _poll_without_pidfd(self) -> None:
        for active in list(self.running.values()):
            if active.job is not None and not active.job.has_pidfd:
                self._reap(active)
