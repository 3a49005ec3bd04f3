"""Per-job cgroups: memory, cpu and pids limits, and a kill that reaches every process.

Two layouts are found under one root (``DISPATCH_CGROUP_ROOT``, default ``/sys/fs/cgroup``):

- **v2**: the root's ``cgroup.controllers`` offers memory and pids. A job gets
  ``<root>/dispatch/<node>/<job>`` with ``memory.max`` (``memory.swap.max`` 0), ``cpu.max``
  and ``pids.max``; ``cgroup.kill`` ends it.
- **hybrid v1**: v1 controllers at ``<root>/memory``, ``pids`` and ``cpu``, cgroup2 without
  controllers at ``<root>/unified``. A job gets ``dispatch/<node>/<job>`` in each, with
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``: no swap), ``pids.max`` and
  ``cpu.cfs_quota_us``; the unified one's ``cgroup.kill`` ends it (without it, every pid in
  the job's cgroups is killed until none is left).

A job is put in its cgroups race-free and without an extra exec: whoever starts it (this
thread, or the root worker's spawner helper) stands in the job's cgroups for the spawn
and goes back right after, so the job is born there, and so is everything it forks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dispatch.errors import DispatchError

log = logging.getLogger(__name__)

MIB = 1 << 20
CPU_PERIOD_US = 100_000
DEFAULT_PIDS_MAX = 4096
#: How long the end of a job waits for its killed processes to leave their cgroup.
REMOVE_WAIT_S = 2.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class CgroupError(DispatchError):
    """Raised when this node cannot create job cgroups under the root it was given."""


@dataclass(frozen=True)
class Limits:
    """What one job may use: memory in MiB (0: no limit), cores, processes."""

    memory_mb: int
    cpus: int
    pids: int


@dataclass(frozen=True)
class _Hierarchy:
    """One mounted hierarchy: the node's directory in it and where the worker lives."""

    kind: str  # "v2", "memory", "pids", "cpu" or "unified"
    node_dir: str
    home: str  # the worker's own cgroup here, where movers go back to
    optional: frozenset[str] = frozenset()  # optional limit files this kernel has

    @classmethod
    def at(cls, kind: str, directory: Path, home: str) -> _Hierarchy:
        """Describe hierarchy ``kind`` with the node's ``directory`` in it."""
        names = ("memory.swap.max", "cpu.max", "memory.memsw.limit_in_bytes")
        return cls(kind, str(directory), home,
                   frozenset(n for n in names if (directory / n).exists()))

    @property
    def v2(self) -> bool:
        return self.kind in ("v2", "unified")


class Cgroups:
    """The node's cgroup layout; makes one :class:`JobCgroup` per job."""

    def __init__(self, version: str, hierarchies: list[_Hierarchy]) -> None:
        self.version = version
        self.hierarchies = hierarchies

    @classmethod
    def detect(cls, root: Path, node: str) -> Cgroups:
        """Find the layout under ``root`` and make the node's directories; raise CgroupError."""
        try:
            return cls._detect(root, _UNSAFE.sub("_", node) or "node")
        except OSError as exc:
            raise CgroupError(f"cannot create cgroups under {root}: {exc.strerror or exc}"
                              ) from None

    @classmethod
    def _detect(cls, root: Path, node: str) -> Cgroups:
        homes = _homes()
        offered = _read(root / "cgroup.controllers").split() \
            if (root / "cgroup.controllers").exists() else []
        if {"memory", "pids"} <= set(offered):
            wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in offered)
            directory = root
            for part in ("dispatch", node):
                _write(directory / "cgroup.subtree_control", wanted)
                directory = directory / part
                directory.mkdir(exist_ok=True)
            _write(directory / "cgroup.subtree_control", wanted)
            return cls("v2", [_Hierarchy.at("v2", directory, _home(root, homes, ""))])
        found: list[_Hierarchy] = []
        for kind, names in (("memory", ("memory",)), ("pids", ("pids",)),
                            ("cpu", ("cpu", "cpu,cpuacct")), ("unified", ("unified",))):
            mount = next((root / n for n in names if (root / n / "cgroup.procs").exists()), None)
            if mount is None:
                if kind in ("memory", "pids"):
                    raise OSError(errno.ENOENT, f"no {kind} controller (v2 or v1)")
                continue
            directory = mount / "dispatch" / node
            directory.mkdir(parents=True, exist_ok=True)
            found.append(_Hierarchy.at(kind, directory,
                                       _home(mount, homes, "" if kind == "unified" else kind)))
        return cls("hybrid v1", found)

    def describe(self) -> str:
        """Return a one-line account of what is enforced, for the node's log."""
        dirs = ", ".join(h.node_dir for h in self.hierarchies)
        return f"cgroup {self.version} under {dirs}"

    def sweep(self, in_use: Callable[[str], bool]) -> None:
        """Remove the empty job cgroups left behind, those whose name is not ``in_use``."""
        for h in self.hierarchies:
            with os.scandir(h.node_dir) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False) and not in_use(entry.name):
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)

    def create(self, name: str, limits: Limits) -> JobCgroup:
        """Make a job's cgroups with ``limits`` written; raise OSError when that fails."""
        name = _UNSAFE.sub("_", name)
        made: list[tuple[_Hierarchy, str]] = []
        job = JobCgroup(made, limits)
        try:
            for h in self.hierarchies:
                if h.kind == "memory" and not limits.memory_mb:
                    continue
                directory = f"{h.node_dir}/{name}"
                os.mkdir(directory)
                made.append((h, directory))
                _limit(h, directory, limits)
        except OSError:
            job.remove()
            raise
        return job


class JobCgroup:
    """One job's cgroups, one per hierarchy."""

    def __init__(self, dirs: list[tuple[_Hierarchy, str]], limits: Limits) -> None:
        self.dirs = dirs
        self.limits = limits

    @contextlib.contextmanager
    def holding(self, pid: int | None) -> Iterator[None]:
        """Keep ``pid`` (None: this thread) in the job's cgroups while a job is spawned."""
        moved: list[_Hierarchy] = []
        try:
            for h, directory in self.dirs:
                _move(h, directory, pid)
                moved.append(h)
            yield
        finally:
            for h in moved:
                with contextlib.suppress(ProcessLookupError):
                    _move(h, h.home, pid)

    def kill(self) -> None:
        """SIGKILL every process in the job's cgroups, however far it wandered."""
        for h, directory in self.dirs:
            if h.v2:
                with contextlib.suppress(FileNotFoundError):  # no cgroup.kill before 5.14
                    _write(f"{directory}/cgroup.kill", "1")
                    return
        for _, directory in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                for pid in _read(f"{directory}/cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    def reasons(self) -> list[str]:
        """Return why the job's cgroups stopped it, if they did (the out-of-memory killer)."""
        found: list[str] = []
        for h, directory in self.dirs:
            events = {"v2": "memory.events", "memory": "memory.oom_control"}.get(h.kind)
            if events and self.limits.memory_mb and _field(f"{directory}/{events}", "oom_kill"):
                found.append(f"exceeded RequestMemory ({self.limits.memory_mb} MiB): "
                             f"killed by the out-of-memory killer")
            refused = _field(f"{directory}/pids.events", "max") if h.kind in ("v2", "pids") else 0
            if refused:
                found.append(f"reached the limit of {self.limits.pids} processes: "
                             f"{refused} forks refused")
        return found

    def remove(self) -> bool:
        """Kill what is left and remove the job's cgroups; False when some stayed busy."""
        deadline = time.monotonic() + REMOVE_WAIT_S
        pause = 0.0005
        for _, directory in reversed(self.dirs):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)
                        return False
                    self.kill()  # a fork that raced the first kill
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        self.dirs = []
        return True


def _limit(h: _Hierarchy, directory: str, limits: Limits) -> None:
    """Write ``limits`` into one new job cgroup of hierarchy ``h``."""
    memory = str(limits.memory_mb * MIB)
    quota = limits.cpus * CPU_PERIOD_US
    if h.kind == "v2":
        if limits.memory_mb:
            _write(f"{directory}/memory.max", memory)
            if "memory.swap.max" in h.optional:
                _write(f"{directory}/memory.swap.max", "0")
        if "cpu.max" in h.optional:
            _write(f"{directory}/cpu.max", f"{quota} {CPU_PERIOD_US}")
        _write(f"{directory}/pids.max", str(limits.pids))
    elif h.kind == "memory":
        _write(f"{directory}/memory.limit_in_bytes", memory)
        if "memory.memsw.limit_in_bytes" in h.optional:
            _write(f"{directory}/memory.memsw.limit_in_bytes", memory)
    elif h.kind == "pids":
        _write(f"{directory}/pids.max", str(limits.pids))
    elif h.kind == "cpu":  # a new cgroup's cfs_period_us is the kernel's 100 ms
        _write(f"{directory}/cpu.cfs_quota_us", str(quota))


def _move(h: _Hierarchy, directory: str, pid: int | None) -> None:
    """Move ``pid``, or this thread alone where v1 allows it, into ``directory``."""
    if pid is None and not h.v2:
        _write(f"{directory}/tasks", str(threading.get_native_id()))
    else:
        _write(f"{directory}/cgroup.procs", str(os.getpid() if pid is None else pid))


def _homes() -> dict[str, str]:
    """Return this process's cgroup path per controller ("" for cgroup2)."""
    homes: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            homes[controller] = path
    return homes


def _home(directory: Path, homes: dict[str, str], controller: str) -> str:
    """Return the worker's cgroup in the hierarchy ``directory`` belongs to."""
    mount = directory
    while not os.path.ismount(mount) and mount.parent != mount:
        mount = mount.parent
    return str(mount / homes.get(controller, "/").lstrip("/"))


def _field(path: str, name: str) -> int:
    """Return the number after ``name`` in a flat-keyed cgroup file (0 when absent)."""
    try:
        text = _read(path)
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def _read(path: str | Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: str | Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
