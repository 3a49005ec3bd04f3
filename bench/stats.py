"""Latency percentiles and throughput figures from raw timings. Pure: no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples_s: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q`` quantile (0 < q <= 1) of ``samples_s``."""
    if not samples_s:
        raise ValueError("no samples")
    ordered = sorted(samples_s)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def latency_figures(samples_s: Sequence[float]) -> dict[str, float]:
    """Return p50, p99, mean and max of round trips, in milliseconds."""
    return {
        "p50_ms": round(percentile(samples_s, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(samples_s, 0.99) * 1e3, 3),
        "mean_ms": round(sum(samples_s) / len(samples_s) * 1e3, 3),
        "max_ms": round(max(samples_s) * 1e3, 3),
        "jobs": len(samples_s),
    }


def throughput_figures(jobs: int, elapsed_s: float) -> dict[str, float]:
    """Return jobs per second for ``jobs`` done in ``elapsed_s``."""
    return {"jobs": jobs, "elapsed_s": round(elapsed_s, 3),
            "jobs_per_s": round(jobs / elapsed_s, 1)}
