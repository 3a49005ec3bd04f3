"""Where a multi-node job's per-node logs and copy-back archives go on the client.

openstack-queue's ``logPath``/``resultsPath`` (the job-file fields ``log_path`` and
``results_path``) are directories of the submitting machine: they are never sent to a
node. ``submit`` remembers them in ``CONFIG_DIR/jobs/<job id>.json``; once the job's
result is saved (``submit --wait``, ``wait``), its ``logs/<node>.out`` and ``.err`` are
copied to ``LOG_PATH/<job id>/`` and its ``copyback/<node>.tar.gz`` to
``RESULTS_PATH/<job id>/``. The result directory keeps its own copies.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dispatch.topology import check_client_id

log = logging.getLogger(__name__)

#: Job-file field -> (folder of the result it takes files from, name patterns).
FIELDS = {"log_path": ("logs", ("*.out", "*.err")), "results_path": ("copyback", ("*.tar.gz",))}


def _record(config_dir: Path, job_id: str) -> Path:
    return config_dir / "jobs" / f"{check_client_id(job_id)}.json"


def wanted(fields: Mapping[str, Any], base_dir: Path) -> dict[str, str]:
    """Return the destinations a job file names, as absolute paths (relative: to the file)."""
    out = {}
    for name in FIELDS:
        if fields.get(name):
            path = Path(str(fields[name])).expanduser()
            out[name] = str((path if path.is_absolute() else base_dir / path).absolute())
    return out


def remember(config_dir: Path, job_id: str, destinations: Mapping[str, str]) -> None:
    """Note where ``job_id``'s per-node files go, for a later ``dispatch wait``."""
    if not destinations:
        return
    path = _record(config_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": job_id, **destinations}) + "\n", encoding="utf-8")


def deliver(config_dir: Path, job_id: str, result_dir: Path) -> dict[str, list[str]]:
    """Copy a saved result's per-node files where the job asked; return what went where.

    Only regular files directly in ``logs/`` and ``copyback/`` are copied (a link is not
    followed). Raises OSError when a destination cannot be written.
    """
    try:
        record = json.loads(_record(config_dir, job_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    copied: dict[str, list[str]] = {}
    for name, (folder, patterns) in FIELDS.items():
        if not record.get(name):
            continue
        target = Path(record[name]) / job_id
        files = sorted({f for p in patterns for f in (result_dir / folder).glob(p)
                        if f.is_file() and not f.is_symlink()})
        target.mkdir(parents=True, exist_ok=True)
        for source in files:
            shutil.copyfile(source, target / source.name, follow_symlinks=False)
        log.info("job %s: %d file(s) of %s/ copied to %s", job_id, len(files), folder, target)
        copied[str(target)] = [f.name for f in files]
    return copied
