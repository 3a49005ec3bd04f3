"""Builders of real event bodies and captured requests for the ledger tests."""

from __future__ import annotations

import datetime
from typing import Any

from dispatch import events
from dispatch.events import Event

T0 = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)


def at(seconds: float) -> str:
    """Return the ISO time ``seconds`` after T0."""
    return (T0 + datetime.timedelta(seconds=seconds)).isoformat()


def request(job_id: str, *, owner: str | None = "alice", reply_to: str | None = None,
            body: bytes = b"", **hdrs: Any) -> dict[str, Any]:
    """Return a captured job message as a node would put it in a claim."""
    props: dict[str, Any] = {"message_id": job_id, "correlation_id": job_id, "priority": 4}
    if owner:
        props["user_id"] = owner
    if reply_to:
        props["reply_to"] = reply_to
    headers = {"Cmd": "/bin/sleep", "Arguments": ["30"], **hdrs}
    return events.capture_request(props, headers, body)


def job(event: Event, job_id: str, attempt: int = 1, *, t: float = 0, pool: str = "p",
        node: str = "n1", **fields: Any) -> dict[str, Any]:
    """Return a job event at T0 + t with the fields the schema requires filled in."""
    defaults: dict[str, dict[str, Any]] = {
        Event.CLAIMED: {"host": node, "lease_s": 30.0, "request": request(job_id)},
        Event.RUNNING: {"host": node, "started_at": at(t)},
        Event.EXITED: {"host": node, "exit_code": 0, "exit_by_signal": False,
                       "exit_signal": None, "duration_s": 1.5, "result_bytes": 123},
        Event.REMOVED: {"host": node, "reason": "removed", "by": "alice"},
        Event.HELD: {"host": node, "reason": "held"},
        Event.REJECTED: {"host": node, "reason": "Cmd: is required"},
        Event.ATTRIBUTE: {"name": "QpiddEndpoint", "value": "h:1"},
        Event.GATHERING: {"held": 1, "min": 2, "max": 3, "cpus": 1, "status": "holds 1 of 2"},
    }
    body = events.job_event(event, job_id=job_id, attempt=attempt, pool=pool, node=node,
                            **{**defaults.get(event, {}), **fields})
    body["at"] = at(t)
    return body


def heartbeat(node: str = "n1", *, t: float = 0, running: tuple[tuple[str, int], ...] = (),
              pools: tuple[str, ...] = ("p",), interval_s: float = 5.0,
              machine: dict[str, Any] | None = None, slots_total: int = 4,
              **fields: Any) -> dict[str, Any]:
    """Return a node heartbeat at T0 + t listing ``running`` (job id, attempt) pairs."""
    body = events.node_event(
        Event.HEARTBEAT, node=node, pools=list(pools),
        machine=machine or {"Cpus": slots_total, "Memory": 8192, "Disk": 100000,
                            "Arch": "X86_64", "OpSys": "LINUX", "Machine": node,
                            "Groups": [], "Pools": list(pools)},
        slots_total=slots_total, slots_free=slots_total - len(running), memory_free_mb=8000,
        running=[{"job_id": j, "attempt": a, "started_at": at(t)} for j, a in running],
        waiting=0, draining=False, jobs_done=0, last_job_at=None, started_at=at(0),
        interval_s=interval_s, lease_s=30.0, **fields)
    body["at"] = at(t)
    return body
