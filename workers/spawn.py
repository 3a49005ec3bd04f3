"""Starting a job's process as cheaply as the kernel allows.

When the job runs as the worker's own user, ``os.posix_spawn`` starts it (glibc
uses ``clone(CLONE_VM|CLONE_VFORK)``: no page tables are copied), after resolving
the command against the *job's* PATH. A root worker that switches jobs to another
account starts them the same way from a helper already running as that account
(:mod:`workers.spawner`); only when no helper can start does it switch IDs here, in
a real ``fork`` made by ``subprocess`` (about 2 ms more per job; docs/benchmarks.md).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

#: Signals Python ignores or blocks for itself, restored to their defaults in the job.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Process(Protocol):
    """What the runner needs of a started process."""

    pid: int

    def poll(self) -> int | None:
        """Return the exit status (negative: killed by that signal), or None while running."""


@dataclass(frozen=True)
class Account:
    """The unprivileged account jobs run as when the worker runs as root."""

    name: str
    uid: int
    gid: int


class SpawnedProcess:
    """A process started with posix_spawn; reaped with waitpid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Return the exit status once the process has ended, without blocking."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def spawn(argv: list[str], *, cwd: Path, env: dict[str, str], stdin: int, stdout: int,
          stderr: int, account: Account | None) -> Process:
    """Start ``argv`` in ``cwd`` as a new session leader with exactly ``env``.

    Raises FileNotFoundError or PermissionError when the command cannot run.
    """
    if account is not None:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                                stderr=stderr, start_new_session=True, close_fds=True,
                                user=account.uid, group=account.gid, extra_groups=[])
    actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
               (os.POSIX_SPAWN_DUP2, stderr, 2)]
    previous = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(cwd)  # posix_spawn has no cwd argument in Python 3.11; the loop is single-threaded
        try:
            pid = _posix_spawn(resolve(argv[0], env.get("PATH", ""), cwd), argv, env, actions)
        except FileNotFoundError:
            if "/" in argv[0]:
                raise
            _which.cache_clear()  # the command moved since it was looked up: look again, once
            pid = _posix_spawn(resolve(argv[0], env.get("PATH", ""), cwd), argv, env, actions)
    finally:
        os.fchdir(previous)
        os.close(previous)
    return SpawnedProcess(pid)


def _posix_spawn(path: str, argv: list[str], env: dict[str, str],
                 actions: list[tuple[int, int, int]]) -> int:
    return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                          setsigdef=_DEFAULT_SIGNALS)


def resolve(command: str, search_path: str, cwd: Path) -> str:
    """Return the file ``command`` names: relative to ``cwd`` when it has a slash, else on PATH."""
    if "/" in command:  # posix_spawn itself says why a named file cannot run
        return command if command.startswith("/") else str(cwd / command)
    found = _which(command, search_path)
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", command)
    return found


@lru_cache(maxsize=512)
def _which(command: str, search_path: str) -> str | None:
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", command)
        try:
            _check_executable(candidate)
        except OSError:
            continue
        return candidate
    return None


def _check_executable(path: str) -> None:
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode) or not os.access(path, os.X_OK):
        raise PermissionError(13, "Permission denied", path)

