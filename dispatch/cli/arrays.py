"""Job arrays on the command line: remember which jobs an array id stands for, summarise them."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from dispatch.topology import check_client_id


def _path(config_dir: Path, array_id: str) -> Path:
    return config_dir / "arrays" / f"{check_client_id(array_id)}.json"


def remember(config_dir: Path, array_id: str, job_ids: list[str]) -> None:
    """Note an array's job ids, so ``dispatch wait ARRAYID`` can expand it later."""
    path = _path(config_dir, array_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"array_id": array_id, "job_ids": job_ids}) + "\n",
                    encoding="utf-8")


def expand(config_dir: Path, ids: Iterable[str]) -> list[str]:
    """Replace each array id among ``ids`` by its jobs' ids; keep other ids as they are."""
    out: list[str] = []
    for job_id in ids:
        try:
            record = json.loads(_path(config_dir, job_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            out.append(job_id)
            continue
        out.extend(str(j) for j in record["job_ids"])
    return out


def summary(statuses: Mapping[str, int]) -> str:
    """Return ``10 jobs: 8 exit 0, 2 exit 1`` for the exit statuses of many jobs."""
    counts = collections.Counter(statuses.values())
    parts = [f"{n} exit {code}" for code, n in sorted(counts.items())]
    return f"{len(statuses)} jobs: " + ", ".join(parts)
