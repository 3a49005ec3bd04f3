"""Saving and describing results, shared by ``submit --wait``, ``wait`` and ``listen``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dispatch.errors import ArchiveError
from dispatch.job import JobState, JobUpdate
from dispatch.result import JobResult


def update_record(update: JobUpdate) -> dict[str, Any]:
    """Return a reply as a JSON-ready record (without the archive)."""
    return {
        "job_id": update.job_id,
        "state": update.state.value,
        "host": update.host,
        "started_at": update.started_at,
        "exit_code": update.exit_code,
        "exit_by_signal": update.exit_by_signal,
        "exit_signal": update.exit_signal,
        "duration_s": update.duration_s,
        "reason": update.reason,
        "attempt": update.attempt,
        "result_bytes": len(update.archive),
    }


def describe(update: JobUpdate) -> str:
    """Return one human line for a reply, as ``listen`` prints it."""
    where = f" on {update.host}" if update.host else ""
    if update.state is JobState.RUNNING:
        return f"{update.job_id}  Running{where}"
    reason = f": {update.reason}" if update.reason else ""
    if update.state is JobState.EXITED:  # the reason: a limit it ran into, a failed setup step
        how = (f"killed by signal {update.exit_signal}" if update.exit_by_signal
               else f"exit {update.exit_code}")
        took = f" in {update.duration_s:.3f}s" if update.duration_s is not None else ""
        return f"{update.job_id}  Exited  {how}{took}{where}{reason}"
    return f"{update.job_id}  {update.state.value}{where}{reason}"


def save(result: JobResult, out_dir: Path) -> Path:
    """Unpack a result into ``out_dir/<job id>/`` and write ``out_dir/<job id>.json``.

    Returns the directory. An archive that cannot be unpacked safely is kept as
    ``<job id>.zip`` and the reason recorded, so nothing is lost.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / result.job_id
    record = update_record(result.update)
    try:
        extracted = result.extract(dest)
        record["skipped"] = list(extracted.skipped)
    except ArchiveError as exc:
        (out_dir / f"{result.job_id}.zip").write_bytes(result.archive)
        record["extract_error"] = str(exc)
    record["directory"] = str(dest)
    (out_dir / f"{result.job_id}.json").write_text(json.dumps(record, indent=2) + "\n",
                                                   encoding="utf-8")
    return dest


def load_saved(out_dir: Path, job_id: str) -> dict[str, Any] | None:
    """Return the record ``save`` wrote for ``job_id``, or None."""
    try:
        data: dict[str, Any] = json.loads((out_dir / f"{job_id}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data


def shell_status(record: dict[str, Any]) -> int:
    """Return the exit status a finished job's record stands for (125 when it never ran)."""
    if record.get("state") != JobState.EXITED.value:
        return 125
    if record.get("exit_by_signal") and record.get("exit_signal"):
        return 128 + int(record["exit_signal"])
    code = record.get("exit_code")
    return int(code) if code is not None else 1
