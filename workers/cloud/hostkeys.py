"""SSH host keys of new servers, read from their console log into a known_hosts file.

cloud-init prints a server's host keys between ``-----BEGIN SSH HOST KEY KEYS-----``
and ``-----END SSH HOST KEY KEYS-----`` on the console, which Nova serves over the
authenticated API: the trusted channel that lets bootstrap check the key it meets
over SSH instead of accepting whatever answers (no AutoAddPolicy, ever).
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable
from pathlib import Path

_BLOCK = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----",
                    re.DOTALL)
_KEY = re.compile(r"^\s*((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+)\s+([A-Za-z0-9+/=]+)", re.MULTILINE)


def from_console(console: str) -> list[tuple[str, str]]:
    """Return the ``(key type, base64 key)`` pairs printed on a server's console."""
    keys: list[tuple[str, str]] = []
    for block in _BLOCK.findall(console):
        keys.extend((m[1], m[2]) for m in _KEY.finditer(block))
    return keys


def host_pattern(host: str, port: int) -> str:
    """Return how known_hosts names ``host`` on ``port``."""
    return host if port == 22 else f"[{host}]:{port}"


def remember(known_hosts: Path, host: str, port: int, keys: Iterable[tuple[str, str]]) -> int:
    """Make ``keys`` the only known keys of ``host:port`` in ``known_hosts``; return how many.

    Lines for the same host are replaced: clouds reuse addresses of deleted servers.
    """
    pattern = host_pattern(host, port)
    new_lines = [f"{pattern} {kind} {key}\n" for kind, key in keys]
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(known_hosts, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        kept = [line for line in handle.readlines()
                if line.split(" ", 1)[0] != pattern]
        handle.seek(0)
        handle.truncate()
        handle.writelines(kept + new_lines)
    return len(new_lines)
