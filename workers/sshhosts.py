"""The hosts file of ``dispatch worker --ssh-hosts``: which SSH hosts to run jobs on.

A YAML mapping with ``hosts`` (a list), optional ``defaults`` applied to every host and
a ``known_hosts`` file (required, top level or per host: host keys are checked against
it and never accepted unseen)::

    known_hosts: /etc/dispatch/known_hosts
    defaults: {user: dispatch, key_file: /etc/dispatch/id_ed25519,
               scratch_root: /scratch/dispatch}
    hosts:
      - {host: astro0010, cores: 12, memory: 48G, groups: [gen5, gen45]}
      - {host: astro0016, cores: 4, memory: 8G, groups: [gen1, slow], port: 2222}

Every mistake is reported on one line naming the file and the field
(``hosts.yaml: hosts[1].cores: must be a whole number of at least 1, not 'four'``).
Parsing does no network I/O: the connections are :mod:`workers.sshlink`'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatch.errors import DispatchError
from dispatch.quantity import parse_size_mib
from dispatch.yamlfile import read_yaml

__all__ = ["HostsFileError", "SshHost", "load_hosts", "parse_hosts"]

_FIELDS = frozenset({"host", "name", "port", "user", "key_file", "cores", "memory", "groups",
                     "scratch_root", "known_hosts", "python"})
_TOP = frozenset({"hosts", "defaults", "known_hosts", "reconnect_max_s"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class HostsFileError(DispatchError):
    """Raised when an SSH hosts file cannot be read or breaks its format (the operator's fault)."""


@dataclass(frozen=True)
class SshHost:
    """One host jobs run on over SSH, and what it offers them."""

    name: str
    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    cores: int
    memory_mb: int
    groups: tuple[str, ...]
    scratch_root: str
    python: str = "python3"


@dataclass(frozen=True)
class HostsFile:
    """A parsed hosts file."""

    hosts: tuple[SshHost, ...]
    #: Longest wait between two attempts to reach a host that is down.
    reconnect_max_s: float = 30.0


def load_hosts(path: Path) -> HostsFile:
    """Read and check the hosts file at ``path``; raise HostsFileError naming the field."""
    data = read_yaml(path, HostsFileError)
    return parse_hosts(data, source=str(path), base=path.parent)


def parse_hosts(data: object, *, source: str = "hosts file",
                base: Path | None = None) -> HostsFile:
    """Check an already loaded hosts file; relative paths are taken from ``base``."""
    fail = _Fail(source)
    if not isinstance(data, Mapping):
        raise fail("", "must be a mapping with a 'hosts' list")
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise fail(unknown[0], f"unknown field (expected one of {', '.join(sorted(_TOP))})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise fail("defaults", "must be a mapping of host fields")
    entries = data.get("hosts")
    if not isinstance(entries, list) or not entries:
        raise fail("hosts", "must be a non-empty list of hosts")
    top = {"known_hosts": data["known_hosts"]} if data.get("known_hosts") else {}
    hosts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise fail(f"hosts[{i}]", "must be a mapping (host, cores, ...)")
        hosts.append(_host({**top, **defaults, **entry}, fail.at(f"hosts[{i}]"), base))
    seen: set[str] = set()
    for i, host in enumerate(hosts):
        if host.name in seen:
            raise fail(f"hosts[{i}].name", f"{host.name!r} is used by another host; give each "
                       "host its own name")
        seen.add(host.name)
    reconnect = data.get("reconnect_max_s", 30.0)
    if isinstance(reconnect, bool) or not isinstance(reconnect, int | float) or reconnect <= 0:
        raise fail("reconnect_max_s", f"must be a number of seconds above 0, not {reconnect!r}")
    return HostsFile(tuple(hosts), float(reconnect))


def _host(entry: Mapping[str, Any], fail: _Fail, base: Path | None) -> SshHost:
    unknown = sorted(set(map(str, entry)) - _FIELDS)
    if unknown:
        raise fail(unknown[0], "unknown field")
    host = _text(entry, "host", fail)
    name = _text(entry, "name", fail, default=host)
    if not _NAME.match(name):
        raise fail("name", f"{name!r} is not a usable node name (letters, digits, _.:-)")
    return SshHost(
        name=name, host=host,
        port=_whole(entry, "port", fail, default=22, top=65535),
        user=_text(entry, "user", fail, default=os.environ.get("USER") or "root"),
        key_file=_path(entry, "key_file", fail, base),
        known_hosts=_path(entry, "known_hosts", fail, base),
        cores=_whole(entry, "cores", fail),
        memory_mb=_memory(entry, fail),
        groups=_groups(entry, fail),
        scratch_root=_text(entry, "scratch_root", fail, default="/tmp/dispatch-jobs"),  # noqa: S108
        python=_text(entry, "python", fail, default="python3"),
    )


def _text(entry: Mapping[str, Any], key: str, fail: _Fail, default: str | None = None) -> str:
    value = entry.get(key, default)
    if value is None:
        raise fail(key, "is required")
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise fail(key, f"must be a non-empty string, not {value!r}")
    return str(value).strip()


def _whole(entry: Mapping[str, Any], key: str, fail: _Fail, default: int | None = None,
           top: int = 1 << 20) -> int:
    value = entry.get(key, default)
    if value is None:
        raise fail(key, "is required")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise fail(key, f"must be a whole number from 1 to {top}, not {value!r}")
    return value


def _path(entry: Mapping[str, Any], key: str, fail: _Fail, base: Path | None) -> Path:
    path = Path(_text(entry, key, fail)).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise fail(key, f"{str(path)!r} is not a readable file")
    return path


def _memory(entry: Mapping[str, Any], fail: _Fail) -> int:
    value = entry.get("memory", 0)
    if isinstance(value, bool):
        raise fail("memory", f"must be a size such as 16G or 2048 (MiB), not {value!r}")
    try:
        return parse_size_mib(value) if value else 0
    except (ValueError, TypeError):
        raise fail("memory", f"must be a size such as 16G or 2048 (MiB), not {value!r}") from None


def _groups(entry: Mapping[str, Any], fail: _Fail) -> tuple[str, ...]:
    value = entry.get("groups") or []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise fail("groups", f"must be a list of labels, not {value!r}")
    if any("," in g for g in value):
        raise fail("groups", "a label cannot hold a comma")
    return tuple(g.strip() for g in value)


class _Fail:
    """Builds one-line errors naming the file and the field."""

    def __init__(self, source: str, prefix: str = "") -> None:
        self.source = source
        self.prefix = prefix

    def at(self, prefix: str) -> _Fail:
        """Return the builder of errors inside ``prefix`` (``hosts[2]``)."""
        return _Fail(self.source, prefix)

    def __call__(self, key: str, problem: str) -> HostsFileError:
        field = ".".join(p for p in (self.prefix, key) if p)
        return HostsFileError(f"{self.source}: {field + ': ' if field else ''}{problem}")
