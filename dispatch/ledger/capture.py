"""What the ledger reads from a job message: owner, resources, command, notify settings.

Lenient on purpose: a rejected job's request is recorded too, so a bad header
leaves its column empty instead of losing the event.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Mapping
from typing import Any

import msgpack

from dispatch import headers as h
from dispatch.errors import InvalidMessageError
from dispatch.job import DEFAULT_MAX_ATTEMPTS

log = logging.getLogger(__name__)

_INT_COLUMNS = {h.REQUEST_CPUS: "cpus", h.REQUEST_MEMORY: "memory_mb",
                h.REQUEST_DISK: "disk_mb", h.MAX_ATTEMPTS: "max_attempts",
                h.ARRAY_INDEX: "array_index", h.ARRAY_SIZE: "array_size"}
_TEXT_COLUMNS = {h.CMD: "command", h.REQUIREMENTS: "requirements", h.JOB_NAME: "job_name",
                 h.ARRAY_ID: "array_id", h.NOTIFY_USER: "notify_user",
                 h.NOTIFY_URL: "notify_url", h.NOTIFICATION: "notification"}


def job_fields(properties: Mapping[str, Any], raw_headers: Mapping[str, Any]) -> dict[str, Any]:
    """Return the job columns a request fills (only those it carries a usable value for)."""
    try:
        hdrs, _ = h.normalize(raw_headers)
    except InvalidMessageError as exc:
        log.info("job %s: headers unreadable (%s); recording properties only",
                 properties.get("message_id"), exc.reason)
        hdrs = {}
    env = h.envelope(properties, raw_headers)
    out: dict[str, Any] = {"owner": env.owner, "reply_to": properties.get("reply_to"),
                           "correlation_id": env.correlation_id,
                           "max_attempts": DEFAULT_MAX_ATTEMPTS}
    priority = properties.get("priority")
    if isinstance(priority, int):
        out["priority"] = priority
    for name, column in _TEXT_COLUMNS.items():
        value = hdrs.get(name)
        if value is not None and not isinstance(value, dict | list):
            out[column] = str(value)
    for name, column in _INT_COLUMNS.items():
        number = _int(hdrs.get(name))
        if number is not None:
            out[column] = number
    args = hdrs.get(h.ARGUMENTS)
    if isinstance(args, list):
        out["arguments"] = [str(a) for a in args]
    elif isinstance(args, str):
        try:
            out["arguments"] = shlex.split(args)
        except ValueError:
            out["arguments"] = args.split()
    return out


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        # isdecimal and ASCII: "²" is a digit int() refuses; 18 digits keep int() cheap.
        digits = value.strip().removeprefix("-")
        if digits.isascii() and digits.isdecimal() and len(digits) <= 18:
            return int(value)
    return None


def pack(request: Mapping[str, Any]) -> bytes:
    """Return a captured request as bytes for the ``request`` column."""
    # Foreign headers may hold text that is not valid UTF-8 (lone surrogates here).
    data: bytes = msgpack.packb(dict(request), use_bin_type=True,
                                unicode_errors="surrogatepass")
    return data


def unpack(data: bytes) -> dict[str, Any]:
    """Return the captured request stored by :func:`pack`."""
    request: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False,
                                              unicode_errors="surrogatepass")
    return request
