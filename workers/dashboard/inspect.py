"""Answers to Flower's ``inspect`` broadcasts, given for every execute node seen alive.

Flower fills ``/api/workers`` and its worker pages by broadcasting Celery control
commands on the pidbox exchange and collecting one reply per worker. The feed keeps
one pidbox queue per alive node (``celery@NODE.celery.pidbox``, as a Celery worker
would) and answers ``ping``, ``stats``, ``active_queues``, ``registered``, ``conf``,
``active``, ``scheduled``, ``reserved`` and ``revoked`` from what the node's events
said. Commands that would act on a worker (``revoke``, ``shutdown``, pool changes)
are not Dispatch's way: they are answered with an error naming ``dispatch rm``.
JSON only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kombu
import kombu.pidbox

from dispatch import broker, topology
from workers.dashboard.events import hostname, mapping
from workers.dashboard.nodes import NodeBook, NodeView, epoch

log = logging.getLogger(__name__)

ACCEPT = ["json"]
#: Broadcasts Flower sends that need no answer and change nothing here.
_IGNORED = frozenset({"enable_events", "disable_events", "heartbeat", "clock", "hello"})
Handler = Callable[..., Any]


class Answers:
    """Builds each inspect reply for one node from the :class:`NodeBook`."""

    def __init__(self, book: NodeBook, broker_info: Mapping[str, Any],
                 queue_type: str | None = None) -> None:
        self.book = book
        self.broker_info = dict(broker_info)
        #: classic or quorum (``DISPATCH_QUEUE_TYPE`` unless given): which queues a pool has.
        self.queue_type = broker.queue_type_in_use(queue_type)

    def handlers(self) -> _Handlers:
        """Return the pidbox handler table (``handler(node_name, **arguments)``)."""
        table = _Handlers()
        for name in ("ping", "stats", "active_queues", "registered", "conf", "active",
                     "scheduled", "reserved", "revoked"):
            table[name] = getattr(self, name)
        for name in _IGNORED:
            table[name] = _ignore
        return table

    def ping(self, node: str, **_: Any) -> dict[str, str]:
        """Answer ``ping``."""
        return {"ok": "pong"}

    def stats(self, node: str, **_: Any) -> dict[str, Any]:
        """Answer ``stats``: slots as the pool, jobs done per name, the node's own figures."""
        view = self.book.node(node)
        beat = view.heartbeat
        started = epoch(beat.get("started_at"), time.time())
        return {
            "total": dict(view.totals),
            "uptime": max(0, int(time.time() - started)),
            "prefetch_count": int(beat.get("slots_total") or 0),
            "pool": {"implementation": "dispatch worker",
                     "max-concurrency": int(beat.get("slots_total") or 0),
                     "free-slots": beat.get("slots_free"), "waiting-jobs": beat.get("waiting"),
                     "processes": [], "max-tasks-per-child": "N/A"},
            "broker": dict(self.broker_info),
            "dispatch": {key: beat.get(key) for key in (
                "jobs_done", "last_job_at", "started_at", "memory_free_mb", "draining",
                "interval_s", "lease_s", "pools")},
        }

    def active_queues(self, node: str, **_: Any) -> list[dict[str, Any]]:
        """Answer ``active_queues``: every queue of each pool the node serves, Celery-shaped.

        Flower's broker page shows the depth of the queues named here: on quorum queues
        that is each pool's three priority-level queues.
        """
        pools = self.book.node(node).heartbeat.get("pools") or []
        return [q for p in pools for q in _queues(str(p), self.queue_type)]

    def registered(self, node: str, **_: Any) -> list[str]:
        """Answer ``registered``: the job names this node has run or runs."""
        view = self.book.node(node)
        return sorted({*view.totals, *(j.name for j in self.book.running_on(node))})

    def conf(self, node: str, **_: Any) -> dict[str, Any]:
        """Answer ``conf``: the node's advertised machine attributes and settings."""
        beat = self.book.node(node).heartbeat
        machine = mapping(beat.get("machine"))
        return {**{f"machine_{k}": v for k, v in machine.items()},
                "pools": beat.get("pools"), "heartbeat_interval_s": beat.get("interval_s"),
                "lease_s": beat.get("lease_s")}

    def active(self, node: str, **_: Any) -> list[dict[str, Any]]:
        """Answer ``active``: the jobs the node's last heartbeat lists as running."""
        view = self.book.node(node)
        return [self._request(view, entry) for entry in view.heartbeat.get("running") or []
                if isinstance(entry, Mapping)]

    def scheduled(self, node: str, **_: Any) -> list[Any]:
        """Answer ``scheduled``: nodes hold no jobs for later."""
        return []

    def reserved(self, node: str, **_: Any) -> list[Any]:
        """Answer ``reserved``: jobs waiting for a slot are not claimed, so not known here."""
        return []

    def revoked(self, node: str, **_: Any) -> list[str]:
        """Answer ``revoked``: jobs removed or held on this node, latest last."""
        return list(self.book.node(node).revoked)

    def _request(self, view: NodeView, entry: Mapping[str, Any]) -> dict[str, Any]:
        job_id = str(entry.get("job_id"))
        job = self.book.job(job_id)
        name = job.name if job else "dispatch.job"
        return {"id": job_id, "name": name, "type": name,
                "args": job.args if job else "[]", "kwargs": job.kwargs if job else "{}",
                "hostname": hostname(view.name),
                "time_start": epoch(entry.get("started_at"), view.beat_at),
                "acknowledged": True, "worker_pid": None,
                "delivery_info": {"exchange": topology.jobs_exchange(),
                                  "routing_key": job.pool if job else None, "priority": None,
                                  "redelivered": int(entry.get("attempt") or 1) > 1}}


class _Handlers(dict[str, Handler]):
    """The handler table; a command nobody handles gets an error, not a crash."""

    def __missing__(self, method: str) -> Handler:
        def refuse(node: str, **_: Any) -> dict[str, str]:
            log.info("flower-feed: %s: not obeying Celery control command %r",
                     hostname(node), method)
            return {"error": f"Dispatch nodes do not take the Celery command {method!r}: "
                             "use dispatch rm, hold or release"}
        return refuse


def _ignore(node: str, **_: Any) -> None:
    return None


def _queues(pool: str, queue_type: str) -> list[dict[str, Any]]:
    """Return a pool's queues in the shape of ``kombu.Queue.as_dict(recurse=True)``."""
    try:
        levels = topology.pool_queues(pool, queue_type)
    except ValueError:
        return [dict(kombu.Queue(pool).as_dict(recurse=True))]
    arguments = topology.pool_queue_arguments(queue_type)
    return [dict(kombu.Queue(name, kombu.Exchange(topology.jobs_exchange(level), "direct",
                                                  durable=True),
                             routing_key=pool, durable=True,
                             queue_arguments=arguments).as_dict(recurse=True))
            for level, name in levels]


class Pidboxes:
    """One pidbox consumer per alive node on one channel, each answering as ``celery@NODE``.

    Broadcasts are answered through ``defer``: the feed runs the answer once it is out
    of ``drain_events``.
    """

    def __init__(self, mailbox: kombu.pidbox.Mailbox, channel: Any, answers: Answers,
                 defer: Callable[[Callable[[], None]], None]) -> None:
        self.mailbox = mailbox
        self.channel = channel
        self.defer = defer
        self.handlers = answers.handlers()
        self.consumers: dict[str, kombu.Consumer] = {}

    def sync(self, alive: set[str]) -> None:
        """Answer for exactly the nodes in ``alive``."""
        for name in sorted(alive - set(self.consumers)):
            node = self.mailbox.Node(hostname(name), state=name, channel=self.channel,
                                     handlers=self.handlers)
            consumer = node.Consumer(channel=self.channel, accept=ACCEPT, no_ack=True,
                                     callbacks=[self._deferred(node)],
                                     on_decode_error=_undecodable)
            consumer.consume()
            self.consumers[name] = consumer
            log.info("flower-feed: answering inspect broadcasts as %s", hostname(name))
        for name in sorted(set(self.consumers) - alive):
            self.consumers.pop(name).cancel()
            log.info("flower-feed: %s went away; no longer answering for it", hostname(name))

    def _deferred(self, node: kombu.pidbox.Node) -> Callable[[Any, Any], None]:
        """Return a callback that leaves the answer (a publish) for later, out of the read."""
        def received(body: Any, message: Any) -> None:
            self.defer(lambda: node.handle_message(body, message))
        return received

    def forget(self) -> None:
        """Drop every consumer without talking to the broker (its connection is gone)."""
        self.consumers.clear()


def _undecodable(message: Any, exc: Exception) -> None:
    log.warning("flower-feed: ignoring a control broadcast that is not JSON: %s", exc)
