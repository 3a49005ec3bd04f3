"""Resident memory of a process, read from ``/proc`` (Linux only). Pure reads, no state."""

from __future__ import annotations

import os


def rss_mib(pid: int | None = None) -> float | None:
    """Return ``pid``'s resident set in MiB (this process when None); None when it is gone."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def spread_mib(samples: list[float | None]) -> float | None:
    """Return how far apart the highest and lowest samples are (None if one is missing)."""
    known = [s for s in samples if s is not None]
    if not known or len(known) != len(samples):
        return None
    return round(max(known) - min(known), 1)
