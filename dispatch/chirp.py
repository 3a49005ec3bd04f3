"""Chirp: a running job publishes attributes (HTCondor's ``condor_chirp set_job_attr``).

The worker gives each job two environment variables: the path of the node's
local datagram socket and a per-job token. ``dispatch chirp set NAME VALUE`` sends
one JSON datagram ``{"token", "name", "value"}`` there; the worker checks the token,
then sends the attribute to the job's reply queue and to the ledger.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from dispatch.errors import InvalidMessageError

SOCKET_ENV = "DISPATCH_CHIRP_SOCKET"
TOKEN_ENV = "DISPATCH_CHIRP_TOKEN"  # noqa: S105 - the variable's name, not a secret
MAX_DATAGRAM_BYTES = 8192
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Attributes the system owns; a job may not overwrite them.
RESERVED = frozenset({"JobId", "JobState", "JobStatus", "Attempt", "RemoteHost", "StartedAt",
                      "ExitCode", "ExitBySignal", "ExitSignal", "JobDuration", "Reason",
                      "HoldReason", "Owner", "Cmd", "Arguments", "Attribute"})


def check_name(name: str) -> str:
    """Return ``name`` if a job may set it, else raise InvalidMessageError."""
    if not _NAME_RE.match(name):
        raise InvalidMessageError(f"{name!r} is not an attribute name (letters, digits, _)",
                                  field="name")
    if name in RESERVED:
        raise InvalidMessageError(f"{name} is set by Dispatch, not by jobs", field="name")
    return name


def encode(token: str, name: str, value: str) -> bytes:
    """Return the datagram that sets one attribute."""
    data = json.dumps({"token": token, "name": check_name(name), "value": value}).encode()
    if len(data) > MAX_DATAGRAM_BYTES:
        raise InvalidMessageError(f"is longer than {MAX_DATAGRAM_BYTES} bytes", field="value")
    return data


def decode(data: bytes) -> tuple[str, str, str]:
    """Return ``(token, name, value)`` of a datagram; raise InvalidMessageError if bad."""
    try:
        body: Any = json.loads(data)
    except ValueError:
        raise InvalidMessageError("is not JSON", field="chirp") from None
    if not isinstance(body, dict) or not all(
            isinstance(body.get(k), str) for k in ("token", "name", "value")):
        raise InvalidMessageError("needs string token, name and value", field="chirp")
    return body["token"], check_name(body["name"]), body["value"]


def send(name: str, value: str, environ: Mapping[str, str] | None = None) -> None:
    """Set attribute ``name`` of the job this process runs in."""
    env = os.environ if environ is None else environ
    path, token = env.get(SOCKET_ENV), env.get(TOKEN_ENV)
    if not path or not token:
        raise InvalidMessageError("not set; chirp works only inside a Dispatch job",
                                  field=SOCKET_ENV)
    data = encode(token, name, value)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, path)


def main(argv: list[str] | None = None) -> int:
    """``python3 -m dispatch.chirp set NAME VALUE``: the standard library is all it needs.

    For jobs whose Python has none of Dispatch's dependencies (``dispatch chirp`` is
    the same command in the full CLI).
    """
    import sys  # noqa: PLC0415 - only the command-line entry needs it

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "set":
        print("usage: python3 -m dispatch.chirp set NAME VALUE", file=sys.stderr)
        return 2
    try:
        send(args[1], args[2])
    except (InvalidMessageError, OSError) as exc:
        print(f"dispatch chirp: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
