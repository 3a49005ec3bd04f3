"""Why is my job not running? Answers from the ledger's jobs and nodes' heartbeats.

Checks, in order: the job is over, held, or running (a multi-node job: how many nodes its
head holds and what it waits for); no live node serves its pool;
it asks for more cores, memory or disk than any node has; no node satisfies its
``Requirements`` (naming the failing terms on the closest nodes); it waits behind
other idle jobs of its pool.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from dispatch import requirements
from dispatch.errors import InvalidRequirementsError
from dispatch.ledger.records import JobRecord, LedgerState, NodeRecord

CLOSEST = 3
_RESOURCES = (("cpus", "RequestCpus", "Cpus", ""), ("memory_mb", "RequestMemory", "Memory", " MiB"),
              ("disk_mb", "RequestDisk", "Disk", " MiB"))


@dataclass
class Explanation:
    """The reasons a job is where it is, most important first."""

    job_id: str
    state: str
    reasons: list[str] = field(default_factory=list)
    matching_nodes: list[str] = field(default_factory=list)
    closest_nodes: dict[str, list[str]] = field(default_factory=dict)
    waiting_behind: int | None = None


def explain(job: JobRecord, nodes: Sequence[NodeRecord], queued_ahead: int,
            now: datetime.datetime) -> Explanation:
    """Explain ``job`` given every node and how many idle jobs of its pool go first."""
    state = job.state
    out = Explanation(job.job_id, state.value)
    if state.is_final:
        out.reasons.append(_final(job))
        return out
    if state is LedgerState.HELD:
        out.reasons.append(f"held: {job.reason or 'no reason given'}; "
                           f"`dispatch release {job.job_id}` sends it out again")
        return out
    if state.is_active:
        out.reasons.append(f"{state.value.lower()} on {job.host} (attempt {job.attempt})")
        gang = (job.attributes or {}).get("GangStatus")
        if gang:  # a multi-node job's head says what it holds and waits for (workers/gang.py)
            out.reasons.append(f"multi-node job: {gang}")
        return out
    if job.control_op:
        out.reasons.append(f"a {job.control_op} is pending: {job.reason}")
    pool_nodes = [n for n in nodes if job.pool in n.pools]
    live = [n for n in pool_nodes if n.online and not n.draining]
    if not live:
        seen = ", ".join(f"{n.name} ({_ago(n.last_heartbeat_at, now)})" for n in pool_nodes)
        out.reasons.append(f"no live node serves pool {job.pool}"
                           + (f"; last seen: {seen}" if seen else "; no node ever did"))
        return out
    out.reasons.extend(_too_big(job, live))
    _requirements(job, live, out)
    if not out.reasons or out.matching_nodes:
        free = sum(n.slots_free for n in live if n.name in out.matching_nodes)
        out.reasons.append(f"waiting behind {queued_ahead} idle job(s) in pool {job.pool}; "
                           f"{len(out.matching_nodes)} node(s) match, {free} slot(s) free")
        out.waiting_behind = queued_ahead
    return out


def _final(job: JobRecord) -> str:
    if job.state is LedgerState.EXITED:
        how = (f"killed by signal {job.exit_signal}" if job.exit_by_signal
               else f"exit code {job.exit_code}")
        return f"finished: {how} on {job.host}"
    return f"{job.state.value.lower()}: {job.reason or 'no reason given'}"


def _too_big(job: JobRecord, nodes: Sequence[NodeRecord]) -> list[str]:
    reasons = []
    for attr, header, machine_attr, unit in _RESOURCES:
        wanted = int(getattr(job, attr) or 0)
        sizes = [_number(n.machine.get(machine_attr)) for n in nodes]
        largest = max(sizes) if sizes else 0
        if wanted > largest:
            reasons.append(f"{header} {wanted}{unit} is larger than any node of pool "
                           f"{job.pool} (largest: {largest}{unit})")
    return reasons


def _requirements(job: JobRecord, nodes: Sequence[NodeRecord], out: Explanation) -> None:
    try:
        expr = requirements.parse(job.requirements or "")
    except InvalidRequirementsError as exc:
        out.reasons.append(f"Requirements cannot be parsed: {exc.reason}")
        return
    failing = {n.name: expr.failing_terms(n.machine) for n in nodes}
    fits = {n.name for n in nodes if _fits(job, n)}
    out.matching_nodes.extend(sorted(n for n, terms in failing.items() if not terms and n in fits))
    if any(not terms for terms in failing.values()):
        return
    closest = sorted(failing.items(), key=lambda kv: (len(kv[1]), kv[0]))[:CLOSEST]
    out.closest_nodes.update(closest)
    common = set.intersection(*(set(t) for t in failing.values()))
    terms = sorted(common) or sorted({t for _, ts in closest for t in ts})
    out.reasons.append(f"no node of pool {job.pool} satisfies Requirements: "
                       f"{' && '.join(terms)} is false on "
                       + ("every node" if common else "the closest nodes") + "; closest: "
                       + "; ".join(f"{name} fails {' && '.join(ts)}" for name, ts in closest))


def _fits(job: JobRecord, node: NodeRecord) -> bool:
    return all(int(getattr(job, attr) or 0) <= _number(node.machine.get(machine_attr))
               for attr, _, machine_attr, _ in _RESOURCES)


def _number(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _ago(when: datetime.datetime | None, now: datetime.datetime) -> str:
    if when is None:
        return "never"
    return f"{int((now - when).total_seconds())} s ago"
