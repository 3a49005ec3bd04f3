"""Scale, part 3: ``dispatch q`` and ``dispatch history`` against a ledger of a million jobs.

The ledger is filled fast with PostgreSQL's ``COPY`` into the ledger's own tables
(:mod:`dispatch.ledger.models`), not with a million events: each row copies one of the
real jobs the nodes phase left in the database (its request, command, history), with a
fresh id, one of 50 owners, one of 20 hosts and times spread over the last 30 days.
Besides the finished jobs, one in a thousand more waits (``Idle``), so ``dispatch q``
has a queue to show. Then the tables are analyzed (as autovacuum would have done by
then) and each command runs as a user runs it, a fresh process with its default limit,
timed from start to exit (with bytecode caches, as installed); the queries they send
are run again in this process, timed, and under EXPLAIN ANALYZE.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import FromClause, event, select, text

from dispatch.ledger.models import HistoryRow, JobRow
from dispatch.ledger.store import Ledger

CHUNK = 100_000
OWNERS, HOSTS = 50, 20
SPAN = dt.timedelta(days=30)
RUNS = 3


def _templates(ledger: Ledger) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Return up to 50 real finished jobs and their history rows."""
    jobs_t, hist_t = JobRow.__table__, HistoryRow.__table__
    with ledger.engine.connect() as conn:
        jobs = [dict(r._mapping) for r in conn.execute(
            select(jobs_t).where(jobs_t.c.state == "Exited").limit(50))]
        history: dict[str, list[dict[str, Any]]] = {}
        for row in conn.execute(select(hist_t).where(
                hist_t.c.job_id.in_([j["job_id"] for j in jobs])).order_by(hist_t.c.id)):
            history.setdefault(row.job_id, []).append(dict(row._mapping))
    if not jobs:
        raise RuntimeError("no finished job in the ledger to copy (run the nodes phase first)")
    return jobs, history


def _rows(jobs: list[dict[str, Any]], history: dict[str, list[dict[str, Any]]], count: int,
          waiting_every: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield ``count`` (job, history) rows made from the templates."""
    prefix = uuid.uuid4().hex[:20]
    start = dt.datetime.now(dt.UTC) - SPAN
    step = SPAN / count
    for i in range(count):
        template = jobs[i % len(jobs)]
        job_id, submitted = f"{prefix}{i:012d}", start + step * i
        waiting = i % waiting_every == waiting_every - 1
        shift = submitted - template["submitted_at"]
        job = {**template, "job_id": job_id, "owner": f"user{i % OWNERS:02d}",
               "host": None if waiting else f"node{i % HOSTS:02d}",
               "state": "Idle" if waiting else "Exited", "submitted_at": submitted,
               "updated_at": submitted}
        for key in ("claimed_at", "started_at", "finished_at"):
            job[key] = None if waiting or job[key] is None else job[key] + shift
        if waiting:
            job.update(exit_code=None, duration_s=None, result_bytes=None)
        events = [] if waiting else [
            {**h, "job_id": job_id, "at": h["at"] + shift,
             "event_id": (h["event_id"] or "").replace(template["job_id"], job_id) or None}
            for h in history.get(template["job_id"], [])]
        yield job, events


def _copy(cursor: Any, table: FromClause, rows: list[dict[str, Any]]) -> None:
    columns = [c.name for c in table.columns if c.name != "id"]
    json_columns = {c.name for c in table.columns if c.type.__class__.__name__ == "JSON"}
    statement = f"COPY {getattr(table, 'name', '')} ({', '.join(columns)}) FROM STDIN"
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([_value(row[c], c in json_columns) for c in columns])


def _value(value: Any, is_json: bool) -> Any:
    """A column's value as the ledger stores it: JSON as text, times as naive UTC."""
    if value is None:
        return None
    if is_json:
        return json.dumps(value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def fill(ledger: Ledger, finished: int) -> dict[str, Any]:
    """Add ``finished`` finished jobs (and one waiting per thousand); return what it took."""
    jobs, history = _templates(ledger)
    waiting_every = 1001
    count = finished + finished // 1000
    started = time.perf_counter()
    raw = ledger.engine.raw_connection()
    try:
        cursor = raw.cursor()
        batch: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        for pair in _rows(jobs, history, count, waiting_every):
            batch.append(pair)
            if len(batch) == CHUNK:
                _flush(cursor, batch)
                raw.commit()
                batch = []
        _flush(cursor, batch)
        raw.commit()
    finally:
        raw.close()
    with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    with ledger.engine.connect() as conn:
        counts: dict[str, int] = {
            str(state): int(n) for state, n in
            conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all()}
        events = conn.execute(text("SELECT count(*) FROM job_history")).scalar()
    return {"elapsed_s": round(time.perf_counter() - started, 1), "jobs_by_state": counts,
            "history_rows": events, "template_jobs": len(jobs)}


def _flush(cursor: Any, batch: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    _copy(cursor, JobRow.__table__, [job for job, _ in batch])
    _copy(cursor, HistoryRow.__table__, [h for _, events in batch for h in events])


def time_commands(db_url: str, work: Path, job_id: str) -> dict[str, Any]:
    """Run each command ``RUNS`` times as a fresh process; return median and min seconds.

    The commands run with bytecode caches, as an installed Dispatch has them (pip
    compiles at install), kept in ``work/pycache`` and written by one untimed run each
    (which also warms the database's cache). Start-up without them is timed apart:
    this machine's environment sets ``PYTHONDONTWRITEBYTECODE``, and without caches
    every process compiles SQLAlchemy from source.
    """
    commands = {"dispatch q --help (start-up only)": ["q", "--help"],
                "dispatch q": ["q"], "dispatch history": ["history"],
                "dispatch history -u user07": ["history", "-u", "user07"],
                "dispatch history JOBID": ["history", job_id]}
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    out: dict[str, Any] = {}
    for name, args in commands.items():
        _run_command([*args, "--db", db_url], work / "src", cached)
        out[name] = _timed([*args, "--db", db_url], work / "src", cached)
    uncached = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    uncached.pop("PYTHONPYCACHEPREFIX", None)
    out["dispatch q --help, no bytecode cache"] = _timed(["q", "--help"], work / "src",
                                                         uncached)
    return out


def _timed(args: list[str], src: Path, env: dict[str, str]) -> dict[str, Any]:
    walls, lines = [], 0
    for _ in range(RUNS):
        started = time.perf_counter()
        lines = _run_command(args, src, env)
        walls.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3),
            "lines": lines}


def _run_command(args: list[str], src: Path, env: dict[str, str]) -> int:
    """Run ``dispatch ARGS`` from the snapshot; return how many lines it printed."""
    done = subprocess.run([sys.executable, "-m", "dispatch", *args], cwd=src, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dispatch {args[0]} failed: {done.stderr[-2000:]}")
    return len(done.stdout.splitlines())


def explain(ledger: Ledger, job_id: str) -> dict[str, Any]:
    """Run what q and history ask of the ledger in process, then EXPLAIN ANALYZE each query."""
    calls: dict[str, Callable[[], object]] = {"q": lambda: ledger.jobs(finished=False),
             "history": lambda: ledger.jobs(finished=True, limit=100),
             "history -u user07": lambda: ledger.jobs(owner="user07", finished=True, limit=100),
             "history JOBID": lambda: ledger.history(job_id)}
    out: dict[str, Any] = {}
    for name, call in calls.items():
        seen: list[tuple[str, Any]] = []

        def capture(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            seen.append((statement, params))  # noqa: B023 - used within this iteration

        event.listen(ledger.engine, "before_cursor_execute", capture)
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        event.remove(ledger.engine, "before_cursor_execute", capture)
        statement, params = next((s, p) for s, p in seen if "FROM job" in s)
        raw = ledger.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            plan = [row[0] for row in cursor.fetchall()]
        finally:
            raw.close()
        out[name] = {"in_process_s": round(elapsed, 4), "plan": plan}
    return out


def measure(db_url: str, work: Path, *, finished: int) -> dict[str, Any]:
    """Fill the ledger at ``db_url`` and time the commands; return the figures."""
    print(f"scale: filling the ledger with {finished} finished jobs", file=sys.stderr)
    ledger = Ledger.open(db_url)
    try:
        filled = fill(ledger, finished)
        job_id = ledger.jobs(finished=True, limit=1)[0].job_id
        print("scale: timing dispatch q and dispatch history", file=sys.stderr)
        commands = time_commands(db_url, work, job_id)
        plans = explain(ledger, job_id)
    finally:
        ledger.close()
    return {"finished_jobs": finished, "fill": filled, "commands": commands, "queries": plans}
