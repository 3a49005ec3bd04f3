"""Slot accounting: which jobs fit this node now, and which never will."""

from __future__ import annotations

from dispatch.job import Resources
from workers.machine import Machine


class Slots:
    """Cores, memory and scratch disk in use on one execute node.

    A job asking for no memory or disk (0) is not counted against those totals.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.cpus_used = 0
        self.memory_used_mb = 0
        self.disk_used_mb = 0

    def never_fits(self, res: Resources) -> str | None:
        """Return why a job can never run here, or None when it can."""
        m = self.machine
        if res.cpus > m.cpus:
            return f"RequestCpus {res.cpus} exceeds this node's {m.cpus} slots"
        if m.memory_mb and res.memory_mb > m.memory_mb:
            return f"RequestMemory {res.memory_mb} MiB exceeds this node's {m.memory_mb} MiB"
        if m.disk_mb and res.disk_mb > m.disk_mb:
            return f"RequestDisk {res.disk_mb} MiB exceeds this node's {m.disk_mb} MiB free"
        return None

    def fits_now(self, res: Resources) -> bool:
        """Tell whether a job fits in what is free right now."""
        m = self.machine
        return (
            self.cpus_used + res.cpus <= m.cpus
            and (not m.memory_mb or self.memory_used_mb + res.memory_mb <= m.memory_mb)
            and (not m.disk_mb or self.disk_used_mb + res.disk_mb <= m.disk_mb)
        )

    def take(self, res: Resources) -> None:
        """Count a started job."""
        self.cpus_used += res.cpus
        self.memory_used_mb += res.memory_mb
        self.disk_used_mb += res.disk_mb

    def give(self, res: Resources) -> None:
        """Stop counting a finished job."""
        self.cpus_used -= res.cpus
        self.memory_used_mb -= res.memory_mb
        self.disk_used_mb -= res.disk_mb

    @property
    def free_cpus(self) -> int:
        """Return the slots not in use."""
        return self.machine.cpus - self.cpus_used
