"""Running one job: a fresh working directory, its own process group, a clean environment.

The runner never blocks: ``start`` spawns the process and returns; the execute
node's loop learns of the exit through ``RunningJob.fileno()`` (a pidfd) and then
calls ``finish``. Killing reaches the whole process tree, including children that
left the job's process group.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dispatch.archive import ExtractLimits, safe_extract, zip_directory
from dispatch.errors import ArchiveError, InvalidMessageError
from dispatch.job import JobRequest

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """How a job's process ended."""

    exit_code: int | None
    exit_by_signal: bool
    exit_signal: int | None
    duration_s: float
    removed: bool = False


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account jobs run as when the worker runs as root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        """Return the account ``name``; raise KeyError when there is none."""
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid)


class RunningJob:
    """A started job: its process, working directory and kill schedule."""

    def __init__(self, request: JobRequest, workdir: Path, proc: subprocess.Popen[bytes],
                 kill_grace_s: float) -> None:
        self.request = request
        self.workdir = workdir
        self.proc = proc
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self.started_mono = time.monotonic()
        limit = request.spec.time_limit_s
        self.deadline = self.started_mono + limit if limit else None
        self.kill_grace_s = kill_grace_s
        self.killed_at: float | None = None
        self.removed = False
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
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

    def kill(self, *, removed: bool = False) -> None:
        """Start killing the job: ``KillSig`` now, SIGKILL after the grace period."""
        self.removed = self.removed or removed
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            signal_tree(self.proc.pid, self.request.spec.kill_signal)

    def poll(self) -> Outcome | None:
        """Return the outcome once the process has exited, else None."""
        code = self.proc.poll()
        if code is None:
            return None
        # Leftovers in the job's process group die with it (one syscall, no /proc scan).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        duration = time.monotonic() - self.started_mono
        if code < 0:
            return Outcome(None, True, -code, duration, self.removed)
        return Outcome(code, False, None, duration, self.removed)

    def close(self) -> None:
        """Release the pidfd."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pid`` and to every descendant that left it."""
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


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


class Runner:
    """Prepares working directories and starts job processes."""

    def __init__(self, workdir_root: Path, run_as: RunAs | None,
                 kill_grace_s: float = DEFAULT_KILL_GRACE_S,
                 extract_limits: ExtractLimits | None = None) -> None:
        self.workdir_root = workdir_root
        self.run_as = run_as
        self.kill_grace_s = kill_grace_s
        self.extract_limits = extract_limits or ExtractLimits()
        workdir_root.mkdir(parents=True, exist_ok=True)

    def prepare(self, request: JobRequest, body: bytes) -> Path:
        """Make the job's fresh working directory and unpack its inputs there.

        Raises InvalidMessageError when the inputs are unsafe or ``In`` is missing.
        """
        workdir = Path(tempfile.mkdtemp(prefix=f"{request.job_id[:40]}.", dir=self.workdir_root))
        try:
            if body:
                try:
                    safe_extract(body, workdir, self.extract_limits)
                except ArchiveError as exc:
                    raise InvalidMessageError(str(exc), field="body") from None
            stdin = request.spec.stdin
            if stdin and not (workdir / stdin).is_file():
                raise InvalidMessageError(f"{stdin!r} is not among the job's input files",
                                          field="In")
            if self.run_as is not None:
                _chown_tree(workdir, self.run_as)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return workdir

    def start(self, request: JobRequest, workdir: Path) -> RunningJob:
        """Spawn the job's process in ``workdir``; a command that cannot run exits 126/127."""
        spec = request.spec
        env = job_environment(request, workdir)
        out = _open_output(workdir / spec.stdout, self.run_as)
        err = out if spec.stderr == spec.stdout else _open_output(workdir / spec.stderr,
                                                                 self.run_as)
        stdin = open(workdir / spec.stdin, "rb") if spec.stdin else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = self._spawn(request, workdir, env, stdin=stdin, out=out, err=err)
        finally:
            for f in {id(out): out, id(err): err}.values():
                f.close()
            if spec.stdin and not isinstance(stdin, int):
                stdin.close()
        return RunningJob(request, workdir, proc, self.kill_grace_s)

    def _spawn(self, request: JobRequest, workdir: Path, env: dict[str, str], *,
               stdin: object, out: object, err: object) -> subprocess.Popen[bytes]:
        argv = [request.spec.command, *request.spec.arguments]
        user = {} if self.run_as is None else {
            "user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                argv, cwd=workdir, env=env, stdin=stdin, stdout=out, stderr=err,
                start_new_session=True, close_fds=True, **user)
            return proc
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"dispatch: cannot run {request.spec.command!r}: {exc.strerror}\n"
            with open(workdir / request.spec.stderr, "a", encoding="utf-8") as f:
                f.write(message)
            log.info("job %s: cannot run %r: %s", request.job_id, request.spec.command, exc)
            return subprocess.Popen(["/bin/sh", "-c", f"exit {code}"], cwd=workdir,
                                    start_new_session=True)

    def finish(self, job: RunningJob, keep: bool = False) -> bytes:
        """Zip the job's working directory, then remove it unless ``keep``."""
        try:
            return zip_directory(job.workdir)
        finally:
            job.close()
            if not keep:
                shutil.rmtree(job.workdir, ignore_errors=True)


def job_environment(request: JobRequest, workdir: Path) -> dict[str, str]:
    """Return the job's environment: a clean base, never the worker's own variables."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "_CONDOR_SCRATCH_DIR": str(workdir),
        "DISPATCH_JOB_ID": request.job_id,
        "DISPATCH_ATTEMPT": str(request.attempt),
    }
    env.update(request.spec.environment)
    return env


def _open_output(path: Path, run_as: RunAs | None) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    if run_as is not None:
        os.fchown(fd, run_as.uid, run_as.gid)
    return os.fdopen(fd, "wb")


def _chown_tree(root: Path, run_as: RunAs) -> None:
    os.chown(root, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), run_as.uid, run_as.gid)
