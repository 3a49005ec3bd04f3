"""Dispatch lifecycle events translated into Celery-format events, as Flower reads them.

Pure: no I/O and no kombu. Each execute node ``N`` becomes the Celery worker
``celery@N``; each job becomes a task whose id is the job id:

=================  =====================================================
Dispatch event     Celery event(s)
=================  =====================================================
node.heartbeat     worker-online (first fresh one), worker-heartbeat
node.offline       worker-offline
job.claimed        task-received (name, args, kwargs, retries = attempt - 1),
                   and task-started when the claim has ``started_at``
job.running        task-started
job.exited         task-succeeded (exit 0) or task-failed, with runtime
job.removed/held   task-revoked (the reason as its exception)
job.rejected       task-rejected
=================  =====================================================
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatch import headers
from dispatch.errors import InvalidMessageError
from dispatch.events import Event
from workers.dashboard.nodes import JobView, NodeBook, epoch

#: The Dispatch events the feed shows; its queue is bound to these only.
SHOWN = (Event.CLAIMED, Event.RUNNING, Event.EXITED, Event.REMOVED, Event.HELD,
         Event.REJECTED, Event.HEARTBEAT, Event.OFFLINE)
#: Longest ``args``/``kwargs`` text sent to Flower (Celery trims its own the same way).
MAX_REPR_CHARS = 1024
SW_IDENT = "dispatch"
#: What a job-event handler returns: the Celery event type and its fields.
Emitted = tuple[str, dict[str, Any]]


def hostname(node: str) -> str:
    """Return the Celery worker name Flower shows for execute node ``node``."""
    return f"celery@{node}"


@dataclass(frozen=True)
class CeleryEvent:
    """One event to send from worker ``hostname``: a Celery event type and its fields."""

    hostname: str
    type: str
    fields: dict[str, Any] = field(default_factory=dict)


def describe(body: Mapping[str, Any]) -> JobView:
    """Return the name and arguments of the job in a claim (or rejection) event."""
    request = mapping(body.get("request"))
    raw, props = mapping(request.get("headers")), mapping(request.get("properties"))
    try:
        found, _ = headers.normalize(raw)
    except InvalidMessageError:
        found = dict(raw)
    cmd = str(found.get(headers.CMD) or "")
    name = str(found.get(headers.JOB_NAME) or cmd or "dispatch.job")
    extra: dict[str, Any] = {"pool": body.get("pool")}
    if name != cmd and cmd:
        extra["cmd"] = cmd
    if props.get("user_id"):
        extra["owner"] = props["user_id"]
    return JobView(job_id=str(body.get("job_id")), name=name,
                   args=_repr(_arguments(found.get(headers.ARGUMENTS))), kwargs=_repr(extra),
                   pool=str(body.get("pool")), attempt=int(body.get("attempt") or 1),
                   node=str(body.get("node")))


def mapping(value: Any) -> Mapping[str, Any]:
    """Return ``value`` when it is a map, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _arguments(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    try:
        return shlex.split(str(value))
    except ValueError:
        return [str(value)]


def _repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR_CHARS else text[: MAX_REPR_CHARS - 3] + "..."


def outcome(body: Mapping[str, Any]) -> str:
    """Return how a job ended, in words: ``exit code 3``, ``killed by signal 9 (SIGKILL)``."""
    if body.get("exit_by_signal"):
        number = body.get("exit_signal")
        try:
            label = f" ({signal.Signals(int(str(number))).name})"
        except ValueError:
            label = ""
        return f"killed by signal {number}{label}"
    return f"exit code {body.get('exit_code')}"


class Translator:
    """Turns Dispatch event bodies into Celery events, keeping a :class:`NodeBook`."""

    def __init__(self, book: NodeBook | None = None, version: str = "0") -> None:
        self.book = book or NodeBook()
        self.software = {"sw_ident": SW_IDENT, "sw_ver": version}

    def translate(self, body: Mapping[str, Any], now: float) -> list[CeleryEvent]:
        """Return the Celery events that tell Flower what ``body`` says (maybe none)."""
        kind = body.get("event")
        if kind == Event.HEARTBEAT.value:
            return self._heartbeat(body, now)
        if kind == Event.OFFLINE.value:
            return self._offline(self.book.seen(str(body.get("node")), now).name)
        handler = _JOB_HANDLERS.get(str(kind))
        if handler is None:
            return []
        node = self.book.seen(str(body.get("node")), now)  # known, so pruned with the others
        fields = {"uuid": str(body.get("job_id")), "timestamp": epoch(body.get("at"), now)}
        found = [CeleryEvent(hostname(node.name), *handler(self, body, fields))]
        if kind == Event.CLAIMED.value and body.get("started_at"):
            # A claim made as the job starts stands for its running event too.
            started = {"uuid": fields["uuid"], "timestamp": epoch(body.get("at"), now)}
            found.append(CeleryEvent(hostname(node.name), *self._running(body, started)))
        return found

    def expire(self, now: float) -> list[CeleryEvent]:
        """Return worker-offline events for alive nodes whose heartbeats stopped."""
        gone = [n.name for n in self.book.alive() if n.expired(now)]
        self.book.prune(now)
        return [e for name in gone for e in self._offline(name)]

    def _heartbeat(self, body: Mapping[str, Any], now: float) -> list[CeleryEvent]:
        node = self.book.seen(str(body.get("node")), now)
        was_alive = node.alive
        if not node.absorb(body, now):
            return []
        fields = {"freq": node.interval_s, "active": len(body.get("running") or ()),
                  "processed": int(body.get("jobs_done") or 0), "loadavg": list(node.load),
                  "sw_sys": str((body.get("machine") or {}).get("OpSys", "")),
                  "timestamp": node.beat_at, **self.software}
        found = [CeleryEvent(hostname(node.name), "worker-heartbeat", fields)]
        if not was_alive:
            found.insert(0, CeleryEvent(hostname(node.name), "worker-online", dict(fields)))
        return found

    def _offline(self, name: str) -> list[CeleryEvent]:
        node = self.book.node(name)
        node.alive = False
        return [CeleryEvent(hostname(name), "worker-offline",
                            {"freq": node.interval_s, **self.software})]

    def _claimed(self, body: Mapping[str, Any], fields: dict[str, Any]) -> Emitted:
        job = describe(body)
        job.received_at = fields["timestamp"]
        self.book.track(job)
        fields.update(name=job.name, args=job.args, kwargs=job.kwargs, retries=job.attempt - 1,
                      root_id=job.job_id, parent_id=None, eta=None, expires=None,
                      exchange=mapping(body.get("request")).get("exchange", ""),
                      routing_key=job.pool)
        return "task-received", fields

    def _running(self, body: Mapping[str, Any], fields: dict[str, Any]) -> Emitted:
        started = epoch(body.get("started_at"), fields["timestamp"])
        job = self.book.job(fields["uuid"])
        if job is not None:  # the claim follows the start by microseconds: keep them in order
            started = max(started, job.received_at)
            job.started_at, job.node = started, str(body.get("node"))
        fields["timestamp"] = started
        return "task-started", fields

    def _exited(self, body: Mapping[str, Any], fields: dict[str, Any]) -> Emitted:
        job = self.book.finish(fields["uuid"])
        node = self.book.node(str(body.get("node")))
        node.totals[job.name if job else "dispatch.job"] += 1
        fields["runtime"] = float(body.get("duration_s") or 0.0)
        if body.get("exit_code") == 0 and not body.get("exit_by_signal"):
            size = body.get("result_bytes")
            fields["result"] = "exit code 0" + (f", {size} bytes of results" if size else "")
            return "task-succeeded", fields
        fields.update(exception=outcome(body), traceback="")
        return "task-failed", fields

    def _revoked(self, body: Mapping[str, Any], fields: dict[str, Any]) -> Emitted:
        job = self.book.finish(fields["uuid"])
        self.book.node(str(body.get("node"))).revoked.append(fields["uuid"])
        verb = "held" if body.get("event") == Event.HELD.value else "removed"
        by = f" by {body['by']}" if body.get("by") else ""
        reason = f": {body['reason']}" if body.get("reason") else ""
        fields.update(terminated=job is not None and job.started_at is not None,
                      signum=None, expired=False, exception=f"{verb}{by}{reason}")
        if body.get("duration_s") is not None:
            fields["runtime"] = float(body["duration_s"])
        return "task-revoked", fields

    def _rejected(self, body: Mapping[str, Any], fields: dict[str, Any]) -> Emitted:
        self.book.finish(fields["uuid"])
        job = describe(body)
        fields.update(name=job.name, args=job.args, kwargs=job.kwargs, requeue=False,
                      exception=f"rejected: {body.get('reason')}")
        return "task-rejected", fields


_JOB_HANDLERS = {
    Event.CLAIMED.value: Translator._claimed,
    Event.RUNNING.value: Translator._running,
    Event.EXITED.value: Translator._exited,
    Event.REMOVED.value: Translator._revoked,
    Event.HELD.value: Translator._revoked,
    Event.REJECTED.value: Translator._rejected,
}
