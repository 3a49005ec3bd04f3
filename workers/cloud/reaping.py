"""Which servers to drain, delete or warn, and why. Pure: the reap task acts on the verdicts.

Rules, for each server Dispatch booted (in this order; the first that applies wins):

1. In ERROR: delete.
2. Drain requested earlier: delete once its node is offline (or never came), or when
   the drain timeout has passed.
3. Lifetime over: drain a node that is online, delete a server without one.
4. Never registered as a worker within the boot timeout: delete.
5. Its node went offline and stayed silent past the boot timeout: delete.
6. Online with no job running and none for the idle timeout: drain.
7. Lifetime ending within the notice period: warn once.

Servers booted for a multi-node job (``gang`` metadata) are never drained as idle (rule 6:
they wait for their job, which deletes them when it ends). While their job gathers (no
``gang_started_at``), they are deleted when its head fell silent for the gang silence
(no ``gang_seen_at`` refresh), or when the ledger says the head is offline or unknown and
it missed two of its 30 s gathering events.

Rules 4-6 need the ledger's view of the nodes; without it (``nodes`` is None) only
rules 1-3 (node unknown: delete on expiry) and 7 run.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from workers.cloud import metadata
from workers.cloud.servers import Server


class NodeView(Protocol):
    """What the reaper reads of a node record in the ledger (``dispatch.ledger`` NodeRecord)."""

    @property
    def name(self) -> str:
        """The node name: the server name of a node Dispatch booted."""

    @property
    def online(self) -> bool:
        """Whether the node is heard from and not offline."""

    @property
    def draining(self) -> bool:
        """Whether the node stopped taking jobs."""

    @property
    def running(self) -> tuple[str, ...]:
        """Ids of the jobs it runs."""

    @property
    def last_heartbeat_at(self) -> datetime.datetime | None:
        """When it was last heard from."""

    @property
    def last_job_at(self) -> datetime.datetime | None:
        """When it last finished a job."""

    @property
    def started_at(self) -> datetime.datetime | None:
        """When its worker started."""


class Action(enum.StrEnum):
    """What to do with a server."""

    DELETE = "delete"
    DRAIN = "drain"
    NOTICE = "notice"


@dataclass(frozen=True)
class Verdict:
    """One decision about one server, with the reason shown by ``reap --dry-run``."""

    server: Server
    action: Action
    reason: str
    failed_boot: bool = False


@dataclass(frozen=True)
class ReapPolicy:
    """The timeouts the rules use, in seconds."""

    boot_timeout_s: int = 900
    idle_timeout_s: int = 600
    drain_timeout_s: int = 3600
    notice_s: int = 0
    gang_silence_s: int = 600


#: A gathering job's head speaks every 30 s; two missed events with its node gone end it.
HEAD_GONE_S = 60


def judge(servers: Sequence[Server], nodes: Mapping[str, NodeView] | None,
          now: datetime.datetime, policy: ReapPolicy) -> list[Verdict]:
    """Return a verdict for each server that needs one (the rules in the module docstring)."""
    verdicts = []
    for server in servers:
        if not metadata.is_ours(server.metadata):
            continue
        node = nodes.get(server.name) if nodes is not None else None
        verdict = _judge_one(server, node, nodes is not None, now, policy)
        if verdict is None and server.metadata.get(metadata.GANG):
            verdict = _gang(server, nodes, now, policy)
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


def _judge_one(server: Server, node: NodeView | None, known: bool, now: datetime.datetime,
               policy: ReapPolicy) -> Verdict | None:
    if server.status == "ERROR":
        return Verdict(server, Action.DELETE, "server is in ERROR", failed_boot=True)
    online = node is not None and node.online
    drain_at = metadata.parse_time(server.metadata.get(metadata.DRAIN_REQUESTED_AT))
    if drain_at is not None:
        return _after_drain(server, online, drain_at, now, policy)
    expires = server.expires_at
    if expires is not None and now >= expires:
        over = f"lifetime ended {_ago(now - expires)} ago"
        return Verdict(server, Action.DRAIN if online else Action.DELETE, over)
    if known:
        verdict = _by_node(server, node, now, policy)
        if verdict is not None:
            return verdict
    return _notice(server, expires, now, policy)


def _after_drain(server: Server, online: bool, drain_at: datetime.datetime,
                 now: datetime.datetime, policy: ReapPolicy) -> Verdict | None:
    why = server.metadata.get(metadata.DRAIN_REASON, "drained")
    if not online:
        return Verdict(server, Action.DELETE, f"drained ({why}); node is offline")
    waited = now - drain_at
    if waited.total_seconds() >= policy.drain_timeout_s:
        return Verdict(server, Action.DELETE,
                       f"drain ({why}) not finished after {_ago(waited)}; drain timeout")
    return None


def _by_node(server: Server, node: NodeView | None, now: datetime.datetime,
             policy: ReapPolicy) -> Verdict | None:
    age = now - server.created_at
    boot_timeout = datetime.timedelta(seconds=policy.boot_timeout_s)
    if node is None:
        if age >= boot_timeout:
            return Verdict(server, Action.DELETE, f"no worker registered within "
                           f"{_ago(boot_timeout)} of boot", failed_boot=True)
        return None
    if not node.online:
        silent = now - (node.last_heartbeat_at or server.created_at)
        if silent >= boot_timeout:
            return Verdict(server, Action.DELETE, f"worker offline for {_ago(silent)}")
        return None
    last_active = node.last_job_at or node.started_at or server.created_at
    idle = now - last_active
    if not node.running and not node.draining and not server.metadata.get(metadata.GANG) \
            and idle.total_seconds() >= policy.idle_timeout_s:
        return Verdict(server, Action.DRAIN, f"idle for {_ago(idle)}")
    return None


def _gang(server: Server, nodes: Mapping[str, NodeView] | None, now: datetime.datetime,
          policy: ReapPolicy) -> Verdict | None:
    """Delete a gathering job's server whose head is gone (module docstring)."""
    if server.metadata.get(metadata.GANG_STARTED_AT):
        return None
    job, head = server.metadata[metadata.GANG], server.metadata.get(metadata.GANG_HEAD, "?")
    seen = metadata.parse_time(server.metadata.get(metadata.GANG_SEEN_AT)) or server.created_at
    silent = now - seen
    if silent.total_seconds() >= policy.gang_silence_s:
        return Verdict(server, Action.DELETE,
                       f"job {job}: no word from its head {head} for {_ago(silent)}")
    if nodes is not None and silent.total_seconds() >= HEAD_GONE_S:
        node = nodes.get(head)
        if node is None or not node.online:
            return Verdict(server, Action.DELETE, f"job {job}: its head {head} is offline "
                           f"and silent for {_ago(silent)}")
    return None


def _notice(server: Server, expires: datetime.datetime | None, now: datetime.datetime,
            policy: ReapPolicy) -> Verdict | None:
    if not policy.notice_s or expires is None or server.metadata.get(metadata.NOTICE_SENT_AT):
        return None
    left = expires - now
    if left.total_seconds() <= policy.notice_s:
        return Verdict(server, Action.NOTICE, f"lifetime ends in {_ago(left)}")
    return None


def _ago(delta: datetime.timedelta) -> str:
    """Return a short human duration: ``42s``, ``5m10s``, ``2h03m``."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
