"""Placement over SSH hosts: which host a job may ever run on, and which one takes it now.

Each host is matched as a daemon node would match itself: its slots
(:class:`~workers.slots.Slots`: cores, memory) and the job's ``Requirements`` against
the host's own attributes (``Machine``, ``Groups``, ``Cpus``...). A job is refused only
when no host, up or down, could ever run it; it starts on the up host with the most
free cores among those that fit it now (the hosts file's order breaks ties).
"""

from __future__ import annotations

from collections.abc import Sequence

from dispatch.job import JobRequest
from workers import intake
from workers.sshlink import HostLink

__all__ = ["HostPool"]


class HostPool:
    """The SSH hosts one node serves, in the hosts file's order."""

    def __init__(self, links: Sequence[HostLink]) -> None:
        self.links = tuple(links)
        self.by_name = {link.name: link for link in self.links}

    def unmet(self, request: JobRequest) -> str | None:
        """Return why no host can ever run ``request``, or None when one can."""
        reasons = []
        for link in self.links:
            reason = intake.unmet(request, link.slots, link.attrs)
            if reason is None:
                return None
            reasons.append(f"{link.name}: {reason}")
        return "no SSH host can run it (" + "; ".join(reasons) + ")"

    def pick(self, request: JobRequest) -> HostLink | None:
        """Return the up host to start ``request`` on now, or None when none fits now."""
        best: HostLink | None = None
        res = request.spec.resources
        for link in self.links:
            if not link.up or not link.slots.fits_now(res):
                continue
            if intake.unmet(request, link.slots, link.attrs) is not None:
                continue
            if best is None or link.slots.free_cpus > best.slots.free_cpus:
                best = link
        return best

    @property
    def cores(self) -> int:
        """Return the cores of all hosts together."""
        return sum(link.machine.cpus for link in self.links)

    @property
    def memory_mb(self) -> int:
        """Return the memory of all hosts together (MiB)."""
        return sum(link.machine.memory_mb for link in self.links)

    def close(self) -> None:
        """Close every host's connection."""
        for link in self.links:
            link.close()
