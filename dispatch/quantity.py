"""Human quantities in job files and on the command line: memory sizes and durations.

Pure. ``2625M``, ``2G`` and ``512`` (MiB) are sizes; ``1d2h30m``, ``90s`` and ``3600``
(seconds) are durations, as wq users write them.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_TO_MIB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024, "b": 1 / (1024 * 1024)}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_DURATION_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_size_mib(value: str | int | float) -> int:
    """Return a size in MiB (rounded up) from ``2G``, ``2625M``, ``512`` (MiB) or a number.

    Raises ValueError with a readable message for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(-(-value // 1))
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 512M, 2G or a number of MiB)")
    number = float(match.group(1))
    unit = (match.group(2) or "m")[0].lower()
    mib = number * _SIZE_TO_MIB[unit]
    return int(-(-mib // 1))


def parse_duration_s(value: str | int | float) -> int:
    """Return seconds from ``1d2h30m``, ``90s``, ``45m``, ``3600`` or a number.

    Raises ValueError with a readable message for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return int(-(-value // 1))
    text = value.strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION_RE.findall(text)
    if not parts or _DURATION_RE.sub("", text).strip():
        raise ValueError(f"not a duration: {value!r} (use e.g. 1d2h30m, 45m, 90s)")
    total = sum(float(number) * _DURATION_S[unit.lower()] for number, unit in parts)
    return int(-(-total // 1))


def format_duration(seconds: float) -> str:
    """Return ``seconds`` the way qstat shows run time: ``0:00:03`` or ``1+02:30:00``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}+{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}"

