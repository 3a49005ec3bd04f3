"""The execute node: one connection, one loop, no scheduler in the path.

A single thread waits on three kinds of event with one selector: the broker's
socket (deliveries, publisher confirms), a pidfd per running job (exits) and a
wake-up pipe (signals). Nothing on the hot path blocks: replies are published
without waiting, and a job message is acked from the confirm callback of its
final reply (at-least-once). Declarations happen once per connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu

from dispatch import broker, events, headers, topology
from dispatch.errors import DispatchError, InvalidJobError
from dispatch.events import ControlOp, Event
from dispatch.job import JobRequest, JobState
from workers import announce, intake
from workers.announce import Announcer
from workers.chirp import ChirpSocket
from workers.machine import Machine, detect
from workers.orders import Order, Orders
from workers.replies import Replies, Settle
from workers.runner import RunAs, Runner, RunningJob
from workers.slots import Slots

log = logging.getLogger(__name__)

ACCEPT = ["application/zip", "application/octet-stream", "application/x-msgpack"]
RECENT_JOBS = 4096
BURST_QUIET_S = 0.3


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one execute node (``dispatch worker`` options)."""

    broker_url: str
    pools: tuple[str, ...] = ("default",)
    slots: int | None = None
    exchange: str | None = None
    routing_key: str | None = None
    queue: str | None = None
    workdir_root: Path = Path("/var/tmp/dispatch")  # noqa: S108
    user: str | None = "nobody"
    groups: tuple[str, ...] = ()
    name: str | None = None
    memory_mb: int | None = None
    heartbeat_s: int = broker.DEFAULT_HEARTBEAT_S
    kill_grace_s: float = 5.0
    burst: bool = False
    #: Seconds between node heartbeats; a claimed job's lease lasts three of them.
    heartbeat_interval_s: float = 10.0
    #: Broker users besides the node's own whose control messages it obeys.
    admins: tuple[str, ...] = ()

    @property
    def lease_s(self) -> float:
        """Return how long a claim stays valid without a heartbeat renewing it."""
        return 3 * self.heartbeat_interval_s


@dataclass
class Active:
    """A job this node holds: running, or waiting for a slot."""

    message: Any  # a kombu Message (untyped)
    request: JobRequest
    env: headers.Envelope
    delivery_tag: int | None
    pool: str
    job: RunningJob | None = None
    #: The remove or hold order that stopped the job, if one did.
    order: Order | None = None
    claimed: bool = False


class ExecuteNode:
    """Consumes job messages, runs them, replies, and acks once the job is safe elsewhere.

    A job is safe once its final reply is confirmed or, when a ledger listens, once its
    claim is: the ledger then holds the request and re-dispatches it should this node's
    heartbeats (the job's lease) stop.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        run_as = None
        if os.geteuid() == 0 and config.user:
            run_as = RunAs.lookup(config.user)
        self.machine: Machine = detect(slots=config.slots, workdir_root=config.workdir_root,
                                       groups=config.groups, pools=config.pools,
                                       name=config.name, memory_mb=config.memory_mb)
        self.attrs = self.machine.attributes()
        self.slots = Slots(self.machine)
        self.runner = Runner(config.workdir_root, run_as, config.kill_grace_s)
        self.running: dict[str, Active] = {}
        self.waiting: collections.deque[Active] = collections.deque()
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.inbox: collections.deque[Any] = collections.deque()
        self.control_inbox: collections.deque[Any] = collections.deque()
        self.stopping = False
        self.draining = False
        self.stop_reason = "stopped"
        self.jobs_done = 0
        self.started_at = events.now()
        self.last_job_at: str | None = None
        self.orders: Orders | None = None
        self._empty_since: float | None = None
        self._next_heartbeat = 0.0
        self._offline_sent = False
        self._claim_mode: bool | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.chirp = ChirpSocket(config.workdir_root, self.machine.name)
        self._selector.register(self.chirp, selectors.EVENT_READ, "chirp")
        self._replies_now: Replies | None = None
        self._announcer: Announcer | None = None
        self._conn: kombu.Connection | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT drain the node: stop taking jobs, finish running ones."""
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def request_stop(self, reason: str = "stopped") -> None:
        """Stop taking jobs; ``run`` returns once running jobs have finished and replied."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        """Serve until stopped, reconnecting with backoff whenever the broker goes away."""
        backoff_s = 0.5
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
                except DispatchError as exc:  # broker unreachable at (re)connect
                    if self.stopping and not self.running:
                        return
                    log.warning("%s; retrying in %.1fs", exc, backoff_s)
                self._idle(backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)
        finally:
            self.chirp.close()

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
        channel = conn.default_channel
        queues = self._declare(channel)
        self._replies_now = Replies(channel, self.machine.name)
        self._announcer = Announcer(self._replies_now.confirms, self.machine.name)
        self._claim_mode = None
        channel.basic_qos(0, self._prefetch(), True)
        consumer = kombu.Consumer(channel, queues=[kombu.Queue(q, no_declare=True) for q in queues],
                                  accept=ACCEPT, on_message=self.inbox.append, no_ack=False)
        consumer.consume()
        self._consume_orders(conn)
        sock = conn.connection.sock
        self._selector.register(sock, selectors.EVENT_READ, "amqp")
        self._rebind_running()
        self._next_heartbeat = 0.0
        log.info("node %s: serving %s with %d slots", self.machine.name, ", ".join(queues),
                 self.machine.cpus)
        try:
            self._loop(conn, consumer)
        finally:
            self._selector.unregister(sock)

    def _declare(self, channel: Any) -> list[str]:
        cfg = self.config
        queues = [broker.declare_pool(channel, pool) for pool in cfg.pools]
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
        kombu.Consumer(channel, queues=[kombu.Queue(queue, no_declare=True)],
                       accept=[events.CONTENT_TYPE], on_message=self.control_inbox.append,
                       no_ack=False).consume()

    def _loop(self, conn: kombu.Connection, consumer: kombu.Consumer) -> None:
        cancelled = False
        while True:
            ready = [key.data for key, _ in self._selector.select(self._timeout())]
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
            self._poll_without_pidfd()
            self._follow_claim_mode()
            if self.stopping and not cancelled:
                consumer.cancel()
                cancelled = True
                self._hand_back_waiting()
            while self.control_inbox:
                self._on_control(self.control_inbox.popleft())
            while self.inbox:
                self._receive(self.inbox.popleft())
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
            if self._finished(cancelled):
                return

    @property
    def _replies(self) -> Replies:
        if self._replies_now is None:
            raise RuntimeError("not connected")
        return self._replies_now

    @property
    def announcer(self) -> Announcer:
        """Return the publisher of this node's events (while connected)."""
        if self._announcer is None:
            raise RuntimeError("not connected")
        return self._announcer

    def _finished(self, cancelled: bool) -> bool:
        idle = not self.running and not self._replies.confirms.outstanding
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
        names = [topology.pool_queue(p) for p in self.config.pools]
        if self.config.queue:
            names.append(self.config.queue)
        for name in names:
            _, count, _ = channel.queue_declare(name, passive=True)
            if count:
                return False
        return True

    def _timeout(self) -> float:
        deadlines = [d for a in self.running.values() if a.job and (d := a.job.next_deadline())]
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

    def _poll_without_pidfd(self) -> None:
        for active in list(self.running.values()):
            if active.job is not None and not active.job.has_pidfd:
                self._reap(active)

    # -- jobs ---------------------------------------------------------------------------

    def _receive(self, message: Any) -> None:
        env = headers.envelope(message.properties, message.headers or {})
        tag = message.delivery_tag
        if self.stopping:
            self._channel().basic_reject(tag, requeue=True)
            return
        if self._duplicate(env.job_id, tag):
            return
        try:
            order = self.orders.stopping_order(env.job_id, env.attempt) if self.orders else None
            if order is not None:
                self._refuse(message, env, order, self._pool_of(message))
            else:
                self._admit(message, env)
        except broker.CONNECTION_ERRORS:
            raise
        except Exception as exc:  # a bug must cost one job, never the node
            log.exception("job %s: unexpected error while admitting it", env.job_id)
            self._reject(message, env, f"internal error on {self.machine.name}: {exc}")

    def _pool_of(self, message: Any) -> str:
        info = message.delivery_info
        if info.get("exchange") == topology.jobs_exchange():
            return str(info.get("routing_key") or topology.DEFAULT_POOL)
        return self.config.queue or str(info.get("routing_key") or topology.DEFAULT_POOL)

    def _admit(self, message: Any, env: headers.Envelope) -> None:
        try:
            request = intake.admit(message.properties, message.headers or {}, message.body,
                                   env=env, slots=self.slots, machine_attrs=self.attrs)
        except InvalidJobError as exc:
            self._reject(message, env, exc.reason)
            return
        active = Active(message, request, env, message.delivery_tag, self._pool_of(message))
        if self.slots.fits_now(request.spec.resources):
            self._start(active)
        else:
            log.info("job %s: waiting for a free slot", env.job_id)
            self.waiting.append(active)

    def _duplicate(self, job_id: str, tag: int) -> bool:
        """Handle a redelivery of a job this node already runs or has finished."""
        if job_id in self.running:
            log.info("job %s: redelivered while running here; keeping one run", job_id)
            active = self.running[job_id]
            if active.claimed:
                self._channel().basic_ack(tag)
            else:
                active.delivery_tag = tag
            return True
        if job_id in self.recent:
            log.info("job %s: redelivered after its result was sent; acking", job_id)
            self._channel().basic_ack(tag)
            return True
        return False

    def _start(self, active: Active) -> None:
        request = active.request
        try:
            workdir = self.runner.prepare(request, active.message.body)
            active.job = self.runner.start(request, workdir,
                                           extra_env=self.chirp.enrol(request.job_id))
        except InvalidJobError as exc:
            self._reject(active.message, active.env, exc.reason)
            return
        except OSError as exc:  # this node's fault (disk full...): let another node try
            log.error("job %s: cannot start here: %s; requeueing", request.job_id, exc)
            self.chirp.forget(request.job_id)
            if active.delivery_tag is not None:
                self._channel().basic_reject(active.delivery_tag, requeue=True)
            return
        self.slots.take(request.spec.resources)
        self.running[request.job_id] = active
        if active.job.has_pidfd:
            self._selector.register(active.job, selectors.EVENT_READ, active)
        if request.spec.resources.cpus > 1 and not self._claim_mode:
            self._update_prefetch()
        self._claim(active)
        self._event(Event.RUNNING, active, host=self.machine.name,
                    started_at=active.job.started_at)
        self._reply(active.env, JobState.RUNNING, b"", host=self.machine.name,
                    started_at=active.job.started_at)

    def _claim(self, active: Active) -> None:
        """Hand the job to the ledger's keeping: ack it once the claim is confirmed."""
        if active.delivery_tag is None or not self.announcer.claims_wanted:
            return
        message = active.message
        request = events.capture_request(message.properties, message.headers or {},
                                         message.body)
        request["exchange"] = message.delivery_info.get("exchange", "")
        request["routing_key"] = message.delivery_info.get("routing_key", "")

        def claimed(ok: bool) -> None:
            if ok and not active.claimed:
                active.claimed = True
                self._ack(active)

        self.announcer.claim(job_id=active.request.job_id, attempt=active.request.attempt,
                             pool=active.pool, request=request, lease_s=self.config.lease_s,
                             settle=claimed)

    def _reap(self, active: Active) -> None:
        job = active.job
        outcome = job.poll() if job is not None else None
        if job is None or outcome is None:
            return
        if job.has_pidfd:
            self._selector.unregister(job)
        request = active.request
        order = active.order
        held = order is not None and order.op is ControlOp.HOLD
        archive = b"" if held else self.runner.archive(job)
        if held:
            job.close()
        del self.running[request.job_id]
        self.chirp.forget(request.job_id)
        self.slots.give(request.spec.resources)
        self.jobs_done += 1
        self.last_job_at = events.now()
        state = JobState.HELD if held else JobState.REMOVED if outcome.removed else JobState.EXITED
        log.debug("job %s: %s code=%s signal=%s in %.3fs", request.job_id, state.value,
                  outcome.exit_code, outcome.exit_signal, outcome.duration_s)
        result = {"host": self.machine.name, "exit_code": outcome.exit_code,
                  "exit_by_signal": outcome.exit_by_signal, "exit_signal": outcome.exit_signal,
                  "duration_s": round(outcome.duration_s, 6)}
        reason = order.describe() if order is not None else None
        if state is JobState.EXITED:
            self._event(Event.EXITED, active, result_bytes=len(archive), **result)
        else:
            self._event(Event.HELD if held else Event.REMOVED, active, reason=reason,
                        by=order.by if order else None, **result)
        self._reply(active.env, state, archive, settle=lambda ok: self._settled(active, ok),
                    reason=None if held else reason, hold_reason=reason if held else None,
                    **result)
        self.runner.cleanup(job)
        if request.spec.resources.cpus > 1 and not self._claim_mode:
            self._update_prefetch()
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self.waiting and not self.stopping:
            if not self.slots.fits_now(self.waiting[0].request.spec.resources):
                return
            self._start(self.waiting.popleft())

    def _hand_back_waiting(self) -> None:
        while self.waiting:
            active = self.waiting.popleft()
            if active.delivery_tag is not None:
                self._channel().basic_reject(active.delivery_tag, requeue=True)

    def _event(self, event: Event, active: Active, **fields: Any) -> None:
        self.announcer.job(event, job_id=active.request.job_id,
                           attempt=active.request.attempt, pool=active.pool, **fields)

    def _reply(self, env: headers.Envelope, state: JobState, body: bytes, *,
               settle: Settle | None = None, **fields: Any) -> None:
        if env.reply_to is None:
            if settle is not None:
                settle(True)
            return
        self._replies.send(env, state, body, settle=settle, **fields)

    def _reject(self, message: Any, env: headers.Envelope, reason: str) -> None:
        log.warning("job %s: rejected: %s", env.job_id, reason)
        self._reply(env, JobState.REJECTED, b"", reason=reason, host=self.machine.name)
        request = events.capture_request(message.properties, message.headers or {}, b"")
        self.announcer.job(Event.REJECTED, job_id=env.job_id, attempt=env.attempt,
                           pool=self._pool_of(message), host=self.machine.name, reason=reason,
                           request=request)
        tag = message.delivery_tag
        self._replies.dead_letter(message, reason,
                                  settle=lambda ok: self._ack_if(ok, tag, env.job_id))

    def _refuse(self, message: Any, env: headers.Envelope, order: Order, pool: str) -> None:
        """Drop a job that was removed or held before it could run here."""
        held = order.op is ControlOp.HOLD
        reason = order.describe()
        log.info("job %s: not run: %s", env.job_id, reason)
        state = JobState.HELD if held else JobState.REMOVED
        tag = message.delivery_tag

        def kept(ok: bool) -> None:
            if ok or not held:
                self._ack_if(True, tag, env.job_id)
            else:  # nobody keeps held jobs (no ledger): park it, never lose it
                self._replies.dead_letter(message, f"{reason} (no ledger keeps held jobs)",
                                          settle=lambda ok: self._ack_if(ok, tag, env.job_id))

        done = _AllSettled(2, kept)
        self._reply(env, state, b"", settle=done, host=self.machine.name,
                    reason=None if held else reason, hold_reason=reason if held else None)
        fields: dict[str, Any] = {"host": self.machine.name, "reason": reason, "by": order.by}
        if held:
            fields["request"] = events.capture_request(message.properties,
                                                       message.headers or {}, message.body)
        self.announcer.job(Event.HELD if held else Event.REMOVED, job_id=env.job_id,
                           attempt=env.attempt, pool=pool, settle=done, must_land=held,
                           **fields)

    def _settled(self, active: Active, ok: bool) -> None:
        job_id = active.request.job_id
        self.recent[job_id] = None
        if len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)
        if active.claimed:
            return
        if ok:
            self._ack(active)
        else:
            self._ack_if(False, active.delivery_tag, job_id)
            active.delivery_tag = None

    def _ack(self, active: Active) -> None:
        """Ack a job message once, whichever of its claim or final reply settles first."""
        if active.delivery_tag is not None:
            self._channel().basic_ack(active.delivery_tag)
            active.delivery_tag = None

    def _ack_if(self, ok: bool, tag: int | None, job_id: str) -> None:
        if tag is None:
            return
        if ok:
            self._channel().basic_ack(tag)
        else:
            log.error("job %s: broker refused the final reply; requeueing the job", job_id)
            self._channel().basic_reject(tag, requeue=True)

    # -- control, chirp, heartbeats -------------------------------------------------------

    def _on_control(self, message: Any) -> None:
        orders = self.orders
        if orders is None:
            return
        try:
            order = orders.parse(message.properties, message.body)
        except InvalidJobError as exc:
            log.warning("control message refused: %s", exc.reason)
            self._replies.dead_letter(message, exc.reason,
                                      settle=lambda ok: message.ack() if ok else message.requeue())
            return
        orders.remember(order)
        log.info("node %s: %s %s by %s", self.machine.name, order.op.value,
                 " ".join(order.job_ids) or "node", order.by)
        if order.op is ControlOp.DRAIN:
            self.draining = True
            self.request_stop(f"drained by {order.by}")
            self._next_heartbeat = 0.0
        elif order.op in (ControlOp.REMOVE, ControlOp.HOLD):
            for job_id in order.job_ids:
                self._stop_job(job_id, order)
        message.ack()

    def _stop_job(self, job_id: str, order: Order) -> None:
        active = self.running.get(job_id)
        if active is not None and active.job is not None:
            if order.applies_to(job_id, active.request.attempt) and active.order is None:
                log.info("job %s: %s", job_id, order.describe())
                active.order = order
                active.job.kill(removed=True)
            return
        for waiting in list(self.waiting):
            if waiting.request.job_id == job_id:
                self.waiting.remove(waiting)
                self._refuse(waiting.message, waiting.env, order, waiting.pool)

    def _chirped(self) -> None:
        for job_id, name, value in self.chirp.receive():
            active = self.running.get(job_id)
            if active is None:
                continue
            log.info("job %s: attribute %s set", job_id, name)
            self._event(Event.ATTRIBUTE, active, name=name, value=value)
            self._reply(active.env, JobState.RUNNING, b"", host=self.machine.name,
                        attribute=(name, value))

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_interval_s
        running = [{"job_id": a.request.job_id, "attempt": a.request.attempt,
                    "started_at": a.job.started_at if a.job else None}
                   for a in self.running.values()]
        self.announcer.heartbeat(
            pools=list(self.config.pools) + ([self.config.queue] if self.config.queue else []),
            machine=self.attrs, slots_total=self.machine.cpus, slots_free=self.slots.free_cpus,
            memory_free_mb=self.machine.memory_mb - self.slots.memory_used_mb,
            running=running, waiting=len(self.waiting), draining=self.draining,
            jobs_done=self.jobs_done, last_job_at=self.last_job_at, started_at=self.started_at,
            interval_s=self.config.heartbeat_interval_s, lease_s=self.config.lease_s)

    def _follow_claim_mode(self) -> None:
        """Prefetch one job at a time while claims ack jobs early, slots' worth otherwise."""
        mode = self.announcer.listening is True
        if mode != self._claim_mode:
            self._claim_mode = mode
            self._update_prefetch()

    # -- connection helpers -------------------------------------------------------------

    def _channel(self) -> Any:
        if self._conn is None:
            raise RuntimeError("not connected")
        return self._conn.default_channel

    def _prefetch(self) -> int:
        if self._claim_mode:
            # Claimed jobs are acked, so prefetch no longer counts them: one job at a
            # time arrives, and at most one waits for a slot.
            return 1
        extra: int = sum(a.request.spec.resources.cpus - 1 for a in self.running.values())
        return max(1, self.machine.cpus - extra)

    def _update_prefetch(self) -> None:
        self._channel().basic_qos(0, self._prefetch(), True)

    def _rebind_running(self) -> None:
        """After a reconnect, old delivery tags are void; redeliveries bring new ones."""
        for active in self.running.values():
            active.delivery_tag = None
        for active in self.waiting:
            active.delivery_tag = None
        self.waiting.clear()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                log.debug("error while releasing a broken connection", exc_info=True)
        self._conn = None
        self._replies_now = None



class _AllSettled:
    """Calls ``done(ok)`` once ``count`` publishes have settled, ``ok`` if all went well."""

    def __init__(self, count: int, done: Settle) -> None:
        self.left = count
        self.ok = True
        self.done = done

    def __call__(self, ok: bool) -> None:
        self.ok = self.ok and ok
        self.left -= 1
        if self.left == 0:
            self.done(self.ok)
