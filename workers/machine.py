"""The machine description an execute node advertises and matches jobs against.

Attribute names follow HTCondor's machine ClassAd: ``Cpus``, ``Memory`` (MiB),
``Disk`` (MiB), ``Arch``, ``OpSys``, ``Machine``, plus ``Groups`` (wq-style labels,
a comma-separated string list) and ``Pools``.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_ARCH = {"x86_64": "X86_64", "amd64": "X86_64", "aarch64": "AARCH64", "arm64": "AARCH64",
         "i686": "INTEL", "i386": "INTEL", "ppc64le": "PPC64LE"}


@dataclass(frozen=True)
class Machine:
    """What one execute node offers: totals, not what is free right now."""

    cpus: int
    memory_mb: int
    disk_mb: int
    arch: str
    opsys: str
    name: str
    groups: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)

    def attributes(self) -> dict[str, object]:
        """Return the ClassAd attributes ``Requirements`` expressions see."""
        attrs: dict[str, object] = {
            "Cpus": self.cpus,
            "TotalCpus": self.cpus,
            "Memory": self.memory_mb,
            "Disk": self.disk_mb,
            "Arch": self.arch,
            "OpSys": self.opsys,
            "Machine": self.name,
            "Name": self.name,
            "Groups": ",".join(self.groups),
            "Pools": ",".join(self.pools),
        }
        attrs.update(self.extra)
        return attrs


def detect(*, slots: int | None = None, workdir_root: Path | None = None,
           groups: Sequence[str] = (), pools: Sequence[str] = (),
           name: str | None = None, memory_mb: int | None = None) -> Machine:
    """Describe this host; ``slots`` and ``memory_mb`` override what is detected."""
    cpus = slots if slots is not None else (os.cpu_count() or 1)
    root = workdir_root if workdir_root is not None else Path("/tmp")  # noqa: S108
    return Machine(
        cpus=cpus,
        memory_mb=memory_mb if memory_mb is not None else _memory_mb(),
        disk_mb=shutil.disk_usage(root).free // (1024 * 1024) if root.exists() else 0,
        arch=_ARCH.get(platform.machine().lower(), platform.machine().upper()),
        opsys=platform.system().upper(),
        name=name or socket.getfqdn(),
        groups=tuple(groups),
        pools=tuple(pools),
    )


def _memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return int(pages * page_size // (1024 * 1024))
