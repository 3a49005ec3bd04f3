"""A started job: its process, its kill schedule, and how it ended.

:class:`RunningJob` is what the execute node's loop holds for each running job: a pidfd
to wait on (``fileno``), the time limit it enforces (``enforce``, ``kill``), and the
outcome once the process has exited (``poll``), with the reasons it went over its
requests. Killing reaches the whole process tree, including children that left the
job's process group, and, where the job has cgroups, everything left in them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dispatch.job import JobRequest
from workers.cgroups import MIB, JobCgroup
from workers.spawn import Process
from workers.spawner import HelperProcess
from workers.stages import StagedRun

log = logging.getLogger(__name__)

__all__ = ["FailedStart", "Outcome", "RunningJob", "disk_used_bytes", "signal_tree"]

@dataclass(frozen=True)
class Outcome:
    """How a job's process ended."""

    exit_code: int | None
    exit_by_signal: bool
    exit_signal: int | None
    duration_s: float
    removed: bool = False
    #: Why the node stopped the job or found it over its request (the reply's Reason).
    reason: str | None = None


class FailedStart:
    """Stands in for a process that could not be started: it has already exited."""

    def __init__(self, code: int) -> None:
        self.pid = 0
        self.returncode = code

    def poll(self) -> int:
        """Return the shell-style status of the failed start (126 or 127)."""
        return self.returncode


class RunningJob:
    """A started job: its process, working directory and kill schedule."""

    def __init__(self, request: JobRequest, workdir: Path, proc: Process,
                 kill_grace_s: float, cgroup: JobCgroup | None = None, *,
                 staged: StagedRun | None = None,
                 chirp_env: Mapping[str, str] | None = None,
                 gang_files: tuple[Path, ...] = ()) -> None:
        self.request = request
        #: A multi-node job's driver files (workers/gang.py): its reason file first.
        self.gang_files = gang_files
        #: A staged job's script (workers/stages.py); None for a plain job.
        self.staged = staged
        self._chirp_env = chirp_env or {}
        self._outcome: Outcome | None = None
        #: The job's cgroups: killed when its process ends, removed at cleanup.
        self.cgroup = cgroup
        self._reasons: list[str] | None = None
        self.workdir = workdir
        self.proc = proc
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self.started_mono = time.monotonic()
        limit = request.spec.time_limit_s
        self.deadline = self.started_mono + limit if limit else None
        self.kill_grace_s = kill_grace_s
        self.killed_at: float | None = None
        self.removed = False
        #: The working directory's entries when its archive was made (plain files only).
        self.listing: tuple[str, ...] | None = None
        self._pidfd: int | None = None
        if isinstance(proc, HelperProcess):
            self._pidfd = proc.pidfd
        elif proc.pid:
            try:
                self._pidfd = os.pidfd_open(proc.pid)
            except (AttributeError, OSError):
                self._pidfd = None

    def fileno(self) -> int:
        """Return a descriptor that becomes readable when the process exits."""
        if self._pidfd is None:
            raise OSError("no pidfd on this system")
        return self._pidfd

    @property
    def has_pidfd(self) -> bool:
        """Tell whether ``fileno`` can be watched by a selector."""
        return self._pidfd is not None

    def next_deadline(self) -> float | None:
        """Return when this job next needs attention (a kill), in monotonic seconds."""
        if self.killed_at is not None:
            return self.killed_at + self.kill_grace_s
        return self.deadline

    def enforce(self, now: float) -> None:
        """Send ``KillSig`` when the time limit passes, SIGKILL once the grace is over."""
        if self.killed_at is None and self.deadline is not None and now >= self.deadline:
            log.info("job %s: time limit of %ss reached", self.request.job_id,
                     self.request.spec.time_limit_s)
            self.kill()
        elif self.killed_at is not None and now >= self.killed_at + self.kill_grace_s:
            signal_tree(self.proc.pid, signal.SIGKILL)
            if self.cgroup is not None:
                self.cgroup.kill()
            self.killed_at = now  # and again each grace period until it is gone

    def kill(self, *, removed: bool = False) -> None:
        """Start killing the job: ``KillSig`` now, SIGKILL after the grace period."""
        self.removed = self.removed or removed
        if self.killed_at is None and self.proc.pid:
            self.killed_at = time.monotonic()
            signal_tree(self.proc.pid, self.request.spec.kill_signal)

    def poll(self) -> Outcome | None:
        """Return the outcome once the process has exited, else None.

        A staged job whose stages left notes (module output, a failed setup step) answers
        None once more after it has exited: its notes are on the node's chirp socket, and
        the node relays chirps before it reaps, so they reach the reply queue and the
        ledger while the job still counts as running. The next call has the outcome.
        """
        if self._outcome is not None:
            return self._outcome
        code = self.proc.poll()
        if code is None:
            return None
        # Leftovers in the job's process group die with it (one syscall, no /proc scan).
        if self.proc.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        duration = time.monotonic() - self.started_mono
        if self._reasons is None:
            self._reasons = self._end()
        reason = "; ".join(self._reasons) or None
        if code < 0:
            self._outcome = Outcome(None, True, -code, duration, self.removed, reason)
        else:
            self._outcome = Outcome(code, False, None, duration, self.removed, reason)
        if self.staged is not None and self.staged.relay(self._chirp_env):
            return None
        return self._outcome

    def _end(self) -> list[str]:
        """Kill what the job left in its cgroups; return how it went over its requests."""
        reasons: list[str] = []
        if self.cgroup is not None:
            self.cgroup.kill()  # daemons that left the process group and session too
            reasons += self.cgroup.reasons()
        if self.staged is not None:  # which stage failed comes first
            spec = self.request.spec
            failed = self.staged.finish((spec.stdout, spec.stderr))
            reasons[:0] = [failed] if failed is not None else []
        if self.gang_files:
            reasons += _gang_reason(self.gang_files)
        disk_mb = self.request.spec.resources.disk_mb
        if disk_mb:
            used = disk_used_bytes(self.workdir)
            if used > disk_mb * MIB:
                reasons.append(f"exceeded RequestDisk ({disk_mb} MiB): its working directory "
                               f"held {used / MIB:.1f} MiB when it ended")
        for reason in reasons:
            log.info("job %s: %s", self.request.job_id, reason)
        return reasons

    def release(self) -> None:
        """Remove the job's cgroups (its processes were killed when it ended)."""
        if self.cgroup is not None:
            self.cgroup.kill()
            self.cgroup.remove()
            self.cgroup = None

    def close(self) -> None:
        """Release the pidfd."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _gang_reason(files: tuple[Path, ...]) -> list[str]:
    """Return the reason a gang driver left, and remove what it was given."""
    reason_file, *others = files
    try:
        reason = reason_file.read_text(encoding="utf-8", errors="replace")[:1000]
    except OSError:
        reason = ""
    for path in (reason_file, *others):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return [reason] if reason else []


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pid`` and to every descendant that left it.

    Descendants are found first (once their parent dies they can no longer be traced
    to the job), but the group, with the job's own process, is signalled first, so the
    job dies of the signal rather than seeing its children die of it.
    """
    escaped = _descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in escaped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def disk_used_bytes(root: Path) -> int:
    """Return the disk space the files under ``root`` take, as ``du`` counts it."""
    total = 0
    stack = [str(root)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
