"""What every part of an execute node shares: its settings, its jobs, its connection."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu
import kombu.exceptions
from amqp import spec

from dispatch import broker, events, headers
from dispatch.chunks import DEFAULT_MAX_RESULT_BYTES
from dispatch.job import JobRequest
from workers import intake
from workers.announce import Announcer
from workers.chirp import ChirpSocket
from workers.machine import Machine, detect
from workers.orders import Order, Orders
from workers.replies import Replies
from workers.runner import RunAs, Runner
from workers.running import RunningJob
from workers.slots import Slots
from workers.spool import Spool

log = logging.getLogger(__name__)



RECENT_JOBS = 4096

#: How long a job runs before its Running reply goes out (``--running-after``). A job
#: that ends sooner gets only its final reply, which says when it started: a client
#: waiting on many short jobs takes one message a job, not two.
RUNNING_AFTER_S = 0.05


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
    #: Largest archive sent as one reply; larger ones go in chunks of this size.
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    #: Where large archives are built and undeliverable results kept (default
    #: ``<workdir_root>/.spool``).
    spool_dir: Path | None = None
    #: Multi-node jobs (workers/gangmember.py): how other nodes reach this one's sshd
    #: (HOST:PORT), as whom (default: the jobs' account), the authorized_keys file that
    #: sshd reads for that user and this node edits, and the sshd's host public key.
    ssh_address: str | None = None
    ssh_user: str | None = None
    ssh_authorized_keys: Path | None = None
    ssh_host_key: Path | None = None
    #: Seconds a job runs before its Running reply is sent (0: as it starts).
    running_after_s: float = RUNNING_AFTER_S

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
    #: When (monotonic) the job is to be claimed, while its claim waits (see CLAIM_AFTER_S).
    claim_due: float | None = None
    #: When (monotonic) its Running reply is due, until it is sent (NodeConfig.running_after_s).
    running_due: float | None = None


class NodeBase:
    """The state of one execute node and its connection helpers.

    The node is built in layers, one concern each: :class:`~workers.jobflow.JobFlow`
    moves jobs through it, :class:`~workers.duties.NodeDuties` obeys orders, relays
    chirps and sends heartbeats, and :class:`~workers.node.ExecuteNode` runs the loop.
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
        self.runner = self._make_runner(run_as)
        self.spool = Spool(config.spool_dir or config.workdir_root / ".spool",
                           config.max_result_bytes)
        self.running: dict[str, Active] = {}
        self.waiting: collections.deque[Active] = collections.deque()
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Jobs whose final reply is published but not yet confirmed.
        self.finishing: dict[str, Active] = {}
        self.inbox: collections.deque[Any] = collections.deque()
        self.control_inbox: collections.deque[Any] = collections.deque()
        self.stopping = False
        self.draining = False
        self.stop_reason = "stopped"
        self.jobs_done = 0
        self._held_name = False  # the broker gave this node its name once
        self.started_at = events.now()
        self.last_job_at: str | None = None
        self.orders: Orders | None = None
        self._empty_since: float | None = None
        self._next_heartbeat = 0.0
        self._next_spawner_check = 0.0
        self._offline_sent = False
        self._claim_mode: bool | None = None
        self._prefetch_sent = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.chirp = ChirpSocket(config.workdir_root, self.machine.name)
        self._selector.register(self.chirp, selectors.EVENT_READ, "chirp")
        self._replies_now: Replies | None = None
        self._announcer: Announcer | None = None
        self._conn: kombu.Connection | None = None
        #: Sends the frames the connection's transport holds (see workers/node.py).
        self._flush_writes: Callable[[], None] = _no_held_writes

    # -- what a node of SSH hosts (workers/sshnode.py) does otherwise ---------------------

    def _make_runner(self, run_as: RunAs | None) -> Runner:
        """Return the runner that starts this node's jobs (here, on this machine)."""
        return Runner(self.config.workdir_root, run_as, self.config.kill_grace_s,
                      node_name=self.machine.name)

    def _unmet(self, request: JobRequest) -> str | None:
        """Return why this node can never run ``request``, or None when it can."""
        return intake.unmet(request, self.slots, self.attrs)

    def _fits_now(self, request: JobRequest) -> bool:
        """Tell whether ``request`` can start now."""
        return self.slots.fits_now(request.spec.resources)

    def _host(self, active: Active) -> str:
        """Return the name of the machine ``active`` runs on (its events' node)."""
        return self.machine.name

    def request_stop(self, reason: str = "stopped") -> None:
        """Stop taking jobs; ``run`` returns once running jobs have finished and replied."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

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

    # -- connection helpers -------------------------------------------------------------

    def _channel(self) -> Any:
        if self._conn is None:
            raise RuntimeError("not connected")
        return self._conn.default_channel

    def _connection(self) -> kombu.Connection:
        if self._conn is None:
            raise RuntimeError("not connected")
        return self._conn

    def _prefetch(self) -> int:
        if self._claim_mode:
            # Claimed jobs are acked, so prefetch no longer counts them: one job beyond
            # the unacked ones arrives at a time, and at most one waits for a slot. Jobs
            # not claimed yet (claims wait CLAIM_AFTER_S) and jobs awaiting their final
            # reply's confirm are still unacked: they are counted.
            unacked = sum(1 for a in (*self.running.values(), *self.finishing.values())
                          if a.delivery_tag is not None)
            return 1 + unacked
        extra: int = sum(a.request.spec.resources.cpus - 1 for a in self.running.values())
        # A finished job keeps its delivery unacked until its final reply is confirmed
        # (a disk write away for a persistent reply), but no longer needs its slot: it
        # must not hold back the next job's delivery meanwhile.
        settling = sum(1 for a in self.finishing.values() if a.delivery_tag is not None)
        return max(1, self.machine.cpus - extra) + settling

    def _update_prefetch(self) -> None:
        """Tell the broker the prefetch the node's slots allow now, if it changed.

        Sent without waiting for ``qos-ok`` (py-amqp ignores an unsolicited one): the
        loop never blocks on a round trip for it.
        """
        want = self._prefetch()
        if want != self._prefetch_sent:
            self._channel().send_method(spec.Basic.Qos, "lBb",
                                        (0, want, broker.prefetch_is_global()))
            self._prefetch_sent = want

    def _unblock_prefetch(self) -> None:
        """Raise the prefetch, if the unacked jobs awaiting a confirm now block deliveries.

        Called as a job finishes. The job's confirm lowers it again, just before the
        job's ack (see ``JobFlow._settled``); one job at a time, nothing blocks and no
        frame goes out.
        """
        if self._unacked() >= self._prefetch_sent and self._prefetch() > self._prefetch_sent:
            self._update_prefetch()

    def _unacked(self) -> int:
        held = (*self.running.values(), *self.finishing.values(), *self.waiting)
        return sum(1 for a in held if a.delivery_tag is not None)

    def _rebind_running(self) -> None:
        """After a reconnect, old delivery tags are void; redeliveries bring new ones."""
        for active in self.running.values():
            active.delivery_tag = None
        # A final reply whose confirm died with the old channel may not have landed: a
        # redelivery of that job runs it again (at-least-once), as it must.
        self.finishing.clear()
        for active in self.waiting:
            active.delivery_tag = None
        self.waiting.clear()

    def _lost_connection(self, exc: BaseException) -> bool:
        """Tell whether ``exc`` means this node's broker connection or channel is gone."""
        return broker.connection_lost(exc, self._conn)

    def _drop_connection(self) -> None:
        broker.release_quietly(self._conn)
        self._conn = None
        self._replies_now = None
        self._flush_writes = _no_held_writes


def _no_held_writes() -> None:
    """Send nothing: the transport holds no writes (none yet, or TLS)."""
