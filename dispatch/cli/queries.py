"""``dispatch q|ls|history|explain``: what the ledger knows, as condor_q and qstat users expect."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import asdict
from typing import Any

import click

from dispatch import broker, events, topology
from dispatch import headers as h
from dispatch.config import DEFAULT_BROKER_URL
from dispatch.errors import BrokerError, InvalidJobError
from dispatch.ledger.explain import explain
from dispatch.ledger.fallback import explain_notes
from dispatch.ledger.records import HistoryEntry, JobRecord, LedgerState, NodeRecord
from dispatch.ledger.store import Ledger, utcnow
from dispatch.progress import table

from .ledger import db_option
from .submit import broker_option

Q_COLUMNS = ["id", "owner", "state", "pool", "pri", "cpus", "memory", "submitted", "started",
             "run_time", "host", "command"]
HISTORY_COLUMNS = ["id", "owner", "state", "pool", "host", "exit", "duration", "finished",
                   "command"]
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _epoch(when: datetime.datetime | None) -> int | None:
    return int(when.timestamp()) if when is not None else None


def classad(job: JobRecord) -> dict[str, Any]:
    """Return a job under HTCondor attribute names (for ``--format``), chirped ones included."""
    ad: dict[str, Any] = {
        h.JOB_ID: job.job_id, "Owner": job.owner, h.JOB_STATUS: job.state.status,
        h.JOB_STATE: job.state.value, h.CMD: job.command,
        h.ARGUMENTS: " ".join(job.arguments), h.REQUEST_CPUS: job.cpus,
        h.REQUEST_MEMORY: job.memory_mb, h.REQUEST_DISK: job.disk_mb,
        h.REMOTE_HOST: job.host, "QDate": _epoch(job.submitted_at),
        "JobStartDate": _epoch(job.started_at), "CompletionDate": _epoch(job.finished_at),
        h.EXIT_CODE: job.exit_code, h.EXIT_BY_SIGNAL: job.exit_by_signal,
        h.EXIT_SIGNAL: job.exit_signal, h.JOB_DURATION: job.duration_s, h.ATTEMPT: job.attempt,
        h.MAX_ATTEMPTS: job.max_attempts, h.JOB_NAME: job.job_name, h.ARRAY_ID: job.array_id,
        h.ARRAY_INDEX: job.array_index, "Pool": job.pool, "JobPrio": job.priority,
        h.HOLD_REASON: job.reason if job.state is LedgerState.HELD else None,
        h.REQUIREMENTS: job.requirements,
    }
    ad.update(job.attributes)
    return ad


def render_format(fmt: str, job: JobRecord) -> str:
    """Fill ``{Attr}`` fields of ``fmt`` from the job's ClassAd; unknown ones are ``undefined``."""
    ad = classad(job)
    text = fmt.encode("utf-8").decode("unicode_escape") if "\\" in fmt else fmt

    def value(match: re.Match[str]) -> str:
        found = ad.get(match.group(1))
        return "undefined" if found is None else str(found)

    return _FIELD.sub(value, text)


def _time(when: datetime.datetime | None) -> str | None:
    return when.astimezone().strftime("%m/%d %H:%M:%S") if when else None


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    return f"{days}+{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def _command(job: JobRecord, full: bool) -> str:
    text = " ".join([job.command or "?", *job.arguments])
    return text if full or len(text) <= 40 else text[:37] + "..."


def _q_row(job: JobRecord, now: datetime.datetime, full: bool) -> dict[str, Any]:
    run = job.duration_s
    if run is None and job.started_at is not None and not job.state.is_final:
        run = (now - job.started_at).total_seconds()
    return {"id": job.job_id if full else job.job_id[:16], "owner": job.owner,
            "state": job.state.value, "pool": job.pool, "pri": job.priority, "cpus": job.cpus,
            "memory": f"{job.memory_mb}M" if job.memory_mb else None,
            "submitted": _time(job.submitted_at), "started": _time(job.started_at),
            "run_time": _duration(run), "host": job.host, "command": _command(job, full)}


def _json_job(job: JobRecord) -> dict[str, Any]:
    record = asdict(job)
    record["state"] = job.state.value
    for key, value in record.items():
        if isinstance(value, datetime.datetime):
            record[key] = value.isoformat()
    return record


def _states(values: tuple[str, ...]) -> list[LedgerState]:
    names = {s.value.lower(): s for s in LedgerState}
    out = []
    for value in (v for text in values for v in text.split(",") if v.strip()):
        if value.strip().lower() not in names:
            raise InvalidJobError(f"unknown state {value!r}; use one of "
                                  f"{', '.join(s.value for s in LedgerState)}", field="--state")
        out.append(names[value.strip().lower()])
    return out


@click.command("q")
@click.option("-u", "--user", "owner", help="Only this owner's jobs.")
@click.option("--state", "states", multiple=True, help="Only jobs in these states "
              "(Idle, Claimed, Running, Held, Removed, Exited, Rejected; comma-separated).")
@click.option("--pool", help="Only this pool's jobs.")
@click.option("--full", is_flag=True, help="Full ids and commands; finished jobs too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of jobs.")
@click.option("--format", "fmt", help="Print each job as this text, {Attr} replaced by the "
              "job's HTCondor attribute (JobId, Owner, JobStatus, RemoteHost, QpiddEndpoint...).")
@db_option
def q_command(owner: str | None, states: tuple[str, ...], pool: str | None, full: bool,
              as_json: bool, fmt: str | None, db: str | None) -> None:
    """List jobs in the queue (not yet finished, unless --state or --full says otherwise)."""
    wanted = _states(states)
    ledger = Ledger.open(db)
    try:
        jobs = ledger.jobs(owner=owner, states=wanted, pool=pool,
                           finished=None if wanted or full else False)
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps([_json_job(j) for j in jobs], indent=2))
    elif fmt is not None:
        for job in jobs:
            click.echo(render_format(fmt, job))
    else:
        now = utcnow()
        click.echo(table([_q_row(j, now, full) for j in jobs], Q_COLUMNS))
        counts = {s.value: sum(j.state is s for j in jobs) for s in LedgerState}
        click.echo(f"{len(jobs)} jobs; " + ", ".join(f"{n} {s.lower()}"
                                                     for s, n in counts.items() if n))


@click.command("history")
@click.argument("job_id", required=False)
@click.option("-u", "--user", "owner", help="Only this owner's jobs.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--full", is_flag=True, help="With JOBID: its attributes too (chirped ones, "
              "module output, a failed setup step), in full.")
@db_option
def history_command(job_id: str | None, owner: str | None, limit: int, as_json: bool,
                    full: bool, db: str | None) -> None:
    """Finished jobs with exit codes and durations; with JOBID, that job's state changes."""
    ledger = Ledger.open(db)
    try:
        if job_id:
            entries = ledger.history(job_id)
            if not entries:
                raise InvalidJobError(f"no job {job_id} in the ledger", field="JOBID")
            job = ledger.job(job_id) if full else None
            _print_history(entries, job.attributes if job else None, as_json)
            return
        jobs = ledger.jobs(owner=owner, finished=True, limit=limit)
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps([_json_job(j) for j in jobs], indent=2))
        return
    click.echo(table([{
        "id": j.job_id, "owner": j.owner, "state": j.state.value, "pool": j.pool,
        "host": j.host, "exit": _exit(j), "duration": _duration(j.duration_s),
        "finished": _time(j.finished_at), "command": _command(j, False)} for j in jobs],
        HISTORY_COLUMNS))


def _print_history(entries: list[HistoryEntry], attributes: dict[str, str] | None,
                   as_json: bool) -> None:
    rows = [{**asdict(e), "at": e.at.isoformat()} for e in entries]
    if as_json:
        click.echo(json.dumps(rows if attributes is None else
                              {"history": rows, "attributes": attributes}, indent=2))
        return
    click.echo(table(rows, ["at", "attempt", "event", "state", "node", "detail"]))
    for name, value in sorted((attributes or {}).items()):
        lines = value.splitlines() or [""]
        click.echo(f"\n{name}: {lines[0]}")
        for line in lines[1:]:
            click.echo(f"    {line}")


def _exit(job: JobRecord) -> str | None:
    if job.exit_by_signal:
        return f"signal {job.exit_signal}"
    return None if job.exit_code is None else str(job.exit_code)


@click.command("explain")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@db_option
def explain_command(job_id: str, as_json: bool, db: str | None) -> None:
    """Say why a job is not running."""
    ledger = Ledger.open(db)
    try:
        job = ledger.job(job_id)
        if job is None:
            raise InvalidJobError(f"no job {job_id} in the ledger", field="JOBID")
        now, nodes = utcnow(), ledger.nodes()
        found = explain(job, nodes, ledger.queued_ahead(job), now)
        found.reasons.extend(explain_notes(ledger, job, nodes, now))  # fallback pools
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(asdict(found), indent=2))
        return
    click.echo(f"job {found.job_id}: {found.state}")
    for reason in found.reasons:
        click.echo(f"  - {reason}")



def slots_bar(used: int, total: int) -> str:
    """Return a slots bar: ``[***.]`` for 3 of 4 slots used."""
    used = max(0, min(used, total))
    return f"[{'*' * used}{'.' * (total - used)}]"


def queue_depths(broker_url: str, pools: list[str],
                 queue_type: str | None = None) -> dict[str, dict[str, int] | None]:
    """Return ``{pool: {ready, consumers}}`` by passive declares; None for a missing pool.

    ``ready`` counts every queue of the pool (on quorum queues, all three priority
    levels); ``consumers`` is the most any of them has, as a node consumes every level.
    """
    kind = broker.queue_type_in_use(queue_type)
    out: dict[str, dict[str, int] | None] = {}
    with broker.connect(broker_url) as conn:
        for pool in pools:
            counts = [_queue_counts(conn, pool, q) for q in topology.pool_queue_names(pool, kind)]
            found = [c for c in counts if c is not None]
            out[pool] = ({"ready": sum(r for r, _ in found),
                          "consumers": max(c for _, c in found)} if found else None)
    return out


def _queue_counts(conn: Any, pool: str, queue: str) -> tuple[int, int] | None:
    """Return ``(ready, consumers)`` of one queue, or None when it is missing."""
    try:
        with broker.translated(f"looking at pool {pool}"):
            channel = conn.channel()  # a missing queue closes it: never the caller's
            _, ready, consumers = channel.queue_declare(queue, passive=True)
            channel.close()
    except BrokerError:
        return None
    return int(ready), int(consumers)


def _node_row(n: NodeRecord, now: datetime.datetime) -> dict[str, Any]:
    used = n.slots_total - n.slots_free
    memory = n.machine.get("Memory")
    running = " ".join(j[:12] for j in n.running[:4])
    if len(n.running) > 4:
        running += f" +{len(n.running) - 4}"
    age = (f"{int((now - n.last_heartbeat_at).total_seconds())}s ago"
           if n.last_heartbeat_at else None)
    return {"node": n.name,
            "state": "draining" if n.draining else ("up" if n.online else
                                                    "down" if _down(n) else "offline"),
            "slots": f"{slots_bar(used, n.slots_total)} {used}/{n.slots_total}",
            "memory": (f"{n.memory_free_mb}/{memory}M free" if n.memory_free_mb is not None
                       else f"{memory}M"),
            "groups": n.machine.get("Groups") or None, "pools": ",".join(n.pools),
            "running": running or None, "heartbeat": age}


def _down(n: NodeRecord) -> bool:
    """Tell whether ``n`` is an SSH host that stopped answering (retried, it comes back)."""
    return (n.offline_reason or "").startswith(events.HOST_DOWN_PREFIX)


def _json_node(n: NodeRecord) -> dict[str, Any]:
    record = asdict(n)
    return {k: v.isoformat() if isinstance(v, datetime.datetime) else v
            for k, v in record.items()}


@click.command("stat")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="Offline nodes too.")
@broker_option
@db_option
def stat_command(as_json: bool, show_all: bool, broker: str | None, db: str | None) -> None:
    """Each node's slots, memory, groups and running jobs; pool totals and queue depths."""
    ledger = Ledger.open(db)
    try:
        nodes = [n for n in ledger.nodes() if n.online or show_all or _down(n)]
    finally:
        ledger.close()
    pools = sorted({p for n in nodes for p in n.pools})
    try:
        depths = queue_depths(broker or DEFAULT_BROKER_URL, pools)
    except BrokerError as exc:
        click.echo(f"dispatch: warning: queue depths unknown: {exc}", err=True)
        depths = dict.fromkeys(pools)
    totals = [{"pool": p, "nodes": sum(p in n.pools for n in nodes),
               "slots": sum(n.slots_total for n in nodes if p in n.pools),
               "free": sum(max(n.slots_free, 0) for n in nodes if p in n.pools),
               "queued": (depths.get(p) or {}).get("ready"),
               "consumers": (depths.get(p) or {}).get("consumers")} for p in pools]
    if as_json:
        click.echo(json.dumps({"nodes": [_json_node(n) for n in nodes], "pools": totals},
                              indent=2))
        return
    now = utcnow()
    click.echo(table([_node_row(n, now) for n in nodes],
                     ["node", "state", "slots", "memory", "groups", "pools", "running",
                      "heartbeat"]))
    click.echo()
    click.echo(table(totals, ["pool", "nodes", "slots", "free", "queued", "consumers"]))
