"""Running one job: a fresh working directory, its own process group, a clean environment.

The runner never blocks: ``start`` spawns the process and returns a
:class:`~workers.running.RunningJob`; the execute node's loop learns of the exit through
its ``fileno()`` (a pidfd) and then calls ``archive`` and ``cleanup``. Where the node can
make cgroups (:mod:`workers.cgroups`) each job runs in its own, limited to its
RequestMemory, RequestCpus and the node's process limit, and everything left in it is
killed when the job's process ends.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import pwd
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from dispatch.archive import zip_directory
from dispatch.errors import ArchiveError, InvalidMessageError
from dispatch.extraction import ExtractLimits, safe_extract
from dispatch.job import JobRequest
from workers.cgroups import CgroupError, Cgroups, JobCgroup, Limits
from workers.running import FailedStart, RunningJob
from workers.spawn import Account, Process, spawn
from workers.spawner import Spawner, SpawnerError
from workers.stages import StagedRun, modules_dir

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_KILL_GRACE_S = 5.0
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_JOB_PIDS_MAX = 4096
#: Finished jobs' directories left for the node's idle moments (see Runner.cleanup);
#: one more is removed at once.
MAX_UNTIDY = 4


class RunAs(Account):
    """The unprivileged account jobs run as when the worker runs as root."""

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        """Return the account ``name``; raise KeyError when there is none."""
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid)


class Runner:
    """Prepares working directories and starts job processes."""

    def __init__(self, workdir_root: Path, run_as: RunAs | None,
                 kill_grace_s: float = DEFAULT_KILL_GRACE_S,
                 extract_limits: ExtractLimits | None = None, *,
                 node_name: str | None = None) -> None:
        self.workdir_root = workdir_root
        self.run_as = run_as
        self.kill_grace_s = kill_grace_s
        self.extract_limits = extract_limits or ExtractLimits()
        workdir_root.mkdir(parents=True, exist_ok=True)
        self._root_prefix = f"{os.path.abspath(workdir_root)}/"
        self._tag = f"{os.getpid():x}-"
        self._serial = itertools.count(1)
        self._spawner: Spawner | None = None
        self._spawner_failed = False
        #: Finished jobs' directories (and their listings) not removed yet.
        self._untidy: collections.deque[tuple[Path, Sequence[str] | None]] = \
            collections.deque()
        self.cgroups = _node_cgroups(node_name or f"pid-{os.getpid()}")
        self.pids_max = int(os.environ.get("DISPATCH_JOB_PIDS_MAX", DEFAULT_JOB_PIDS_MAX))
        self.modules_dir = modules_dir()
        self._spare: JobCgroup | None = None
        self._make_spare()
        if run_as is not None:
            self._helper()

    @property
    def helper_pid(self) -> int | None:
        """Return the pid of the job spawner, or None when jobs are not started through one."""
        return self._spawner.helper_pid if self._spawner is not None else None

    def check_spawner(self) -> None:
        """Notice a job spawner that died (its jobs are killed); the next job starts another."""
        if self._spawner is not None and not self._spawner.check():
            log.warning("job spawner %d is gone; a new one starts with the next job",
                        self._spawner.helper_pid)
            self._spawner.close()
            self._spawner = None

    def close(self) -> None:
        """Stop the job spawner, if one runs (jobs it started run on, as orphans).

        The node's cgroup directories go too, unless jobs still run in them.
        """
        if self._spare is not None:
            self._spare.remove()
            self._spare = None
        for h in self.cgroups.hierarchies if self.cgroups is not None else ():
            with contextlib.suppress(OSError):  # still holds jobs (or a twin's spare)
                os.rmdir(h.node_dir)
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None
        self.tidy()

    def prepare(self, request: JobRequest, body: bytes) -> Path:
        """Make the job's fresh working directory and unpack its inputs there.

        Raises InvalidMessageError when the inputs are unsafe or ``In`` is missing.
        """
        workdir = self._new_workdir(request.job_id)
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
            if request.spec.stages is not None:  # a staged job (workers/stages.py)
                staged = StagedRun(request, workdir, self.modules_dir)
                staged.check_modules()
                staged.write()
            if self.run_as is not None:
                _chown_tree(workdir, self.run_as)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return workdir

    def _new_workdir(self, job_id: str) -> Path:
        """Make an empty directory, mode 0700, named after the job and unique in the root.

        The root is this node's alone, so a serial number does what mkdtemp's random
        names do in a shared /tmp; names left by an earlier run are stepped over.
        """
        while True:
            path = f"{self._root_prefix}{job_id[:40]}.{self._tag}{next(self._serial)}"
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            return Path(path)

    def start(self, request: JobRequest, workdir: Path, *,
              extra_env: Mapping[str, str] | None = None) -> RunningJob:
        """Start the job's process in ``workdir``; a command that cannot run exits 126/127.

        ``extra_env`` comes from the node (chirp's socket and token) and wins over the job's.
        """
        spec = request.spec
        env = job_environment(request, workdir)
        env.update(extra_env or {})
        out = _open_output(workdir, spec.stdout, self.run_as)
        err = out if spec.stderr == spec.stdout else _open_output(workdir, spec.stderr,
                                                                 self.run_as)
        stdin = (os.open(workdir / spec.stdin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                 if spec.stdin else None)
        staged = (StagedRun(request, workdir, self.modules_dir)
                  if spec.stages is not None else None)
        argv = staged.argv if staged is not None else [spec.command, *spec.arguments]
        proc: Process
        cgroup = self._cgroup(request, workdir)
        try:
            proc = self._spawn(argv, cwd=workdir, env=env,
                               stdin=_devnull() if stdin is None else stdin, stdout=out,
                               stderr=err, cgroup=cgroup)
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            os.write(err, f"dispatch: cannot run {spec.command!r}: {exc.strerror}\n".encode())
            log.info("job %s: cannot run %r: %s", request.job_id, spec.command, exc)
            proc = FailedStart(code)
        finally:
            for fd in {out, err} if stdin is None else {stdin, out, err}:
                os.close(fd)
        return RunningJob(request, workdir, proc, self.kill_grace_s, cgroup, staged=staged,
                          chirp_env=extra_env)

    def _cgroup(self, request: JobRequest, workdir: Path) -> JobCgroup | None:
        """Make the job's cgroups; None (the job runs unconfined) when there are none."""
        if self.cgroups is None:
            return None
        res = request.spec.resources
        limits = Limits(res.memory_mb, res.cpus, self.pids_max)
        if self._spare is not None and self._spare.limits == limits:
            spare, self._spare = self._spare, None
            return spare
        try:
            return self.cgroups.create(workdir.name, limits)
        except OSError as exc:
            log.error("job %s: cannot make its cgroups, it runs without limits: %s",
                      request.job_id, exc)
            return None

    def _make_spare(self) -> None:
        """Make the next plain job's cgroups ahead, between jobs, off its start's path."""
        if self.cgroups is not None and self._spare is None:
            name = f"next.{self._tag}{next(self._serial)}"
            with contextlib.suppress(OSError):
                self._spare = self.cgroups.create(name, Limits(0, 1, self.pids_max))

    def _spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], stdin: int,
               stdout: int, stderr: int, cgroup: JobCgroup | None = None) -> Process:
        """Start the job; its starter stands in ``cgroup`` meanwhile: the job is born there."""
        if self.run_as is None:
            with _inside(cgroup, None):
                return spawn(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                             stderr=stderr, account=None)
        for _ in range(2):  # a helper that died is replaced once
            helper = self._helper()
            if helper is None:
                break
            try:
                with _inside(cgroup, helper.helper_pid):
                    return helper.spawn(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                                        stderr=stderr)
            except SpawnerError:
                continue
        with _inside(cgroup, None):
            return spawn(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                         account=self.run_as)

    def _helper(self) -> Spawner | None:
        """Return the running job spawner, starting one if needed; None to fork instead."""
        if self._spawner is not None and self._spawner.alive:
            return self._spawner
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None
        if self._spawner_failed or self.run_as is None:
            return None
        try:
            self._spawner = Spawner(self.run_as)
        except SpawnerError as exc:
            log.warning("%s; jobs are forked from the worker instead (slower)", exc)
            self._spawner_failed = True
            return None
        log.debug("job spawner started as %s (pid %d)", self.run_as.name,
                  self._spawner.helper_pid)
        return self._spawner

    def archive(self, job: RunningJob) -> bytes:
        """Return the zip of the job's working directory."""
        job.close()
        return zip_directory(job.workdir)

    def cleanup(self, job: RunningJob) -> None:
        """Release the job's cgroups; its directory goes when the node is next idle.

        Removing a directory costs 0.2-0.5 ms on ext4 (``unlink`` and ``rmdir`` wait
        on a journal the broker's ``fsync`` calls keep busy): done at once, it delays
        the next job's start and reply. So the node calls ``tidy`` when it has nothing
        else to do, and at most MAX_UNTIDY directories wait; a node that is never idle
        removes one directory a job, as before.
        """
        job.release()
        self._untidy.append((job.workdir, job.listing))
        if len(self._untidy) > MAX_UNTIDY:
            remove_tree(*self._untidy.popleft())
        self._make_spare()

    @property
    def untidy(self) -> bool:
        """Tell whether finished jobs' directories wait for ``tidy``."""
        return bool(self._untidy)

    def tidy(self) -> None:
        """Remove the finished jobs' directories still waiting."""
        while self._untidy:
            remove_tree(*self._untidy.popleft())


def _inside(cgroup: JobCgroup | None, pid: int | None) -> contextlib.AbstractContextManager[None]:
    """Keep ``pid`` (None: this thread) in ``cgroup``, if any, for a spawn."""
    return contextlib.nullcontext() if cgroup is None else cgroup.holding(pid)


def _started_by_a_live_process(name: str) -> bool:
    """Tell whether a job cgroup's (or directory's) name carries a live runner's pid tag."""
    found = re.search(r"\.([0-9a-f]+)-[0-9]+$", name)
    if found is None:
        return False
    try:
        os.kill(int(found.group(1), 16), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _node_cgroups(node: str) -> Cgroups | None:
    """Return the node's cgroups, or None after saying, once, why jobs run without."""
    root = Path(os.environ.get("DISPATCH_CGROUP_ROOT") or DEFAULT_CGROUP_ROOT)
    try:
        cgroups = Cgroups.detect(root, node)
    except CgroupError as exc:
        log.warning("%s; jobs run without cgroups: RequestMemory and RequestCpus are "
                    "accounted, not enforced (TimeLimit and RequestDisk still are)", exc)
        return None
    cgroups.sweep(_started_by_a_live_process)
    log.info("jobs run in their own cgroups (%s): RequestMemory, RequestCpus and a process "
             "limit enforced", cgroups.describe())
    return cgroups


def remove_tree(path: Path, names: Sequence[str] | None = None) -> None:
    """Remove a job directory: flat ones with a few syscalls, anything else with rmtree.

    ``names`` are the directory's entries, all plain files, when the caller has just
    listed it; anything that appeared since makes ``rmdir`` fail and rmtree take over.
    """
    if names is not None:
        base = str(path)
        try:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{base}/{name}")
            os.rmdir(base)
            return
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


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
    if request.spec.array is not None:
        env["DISPATCH_ARRAY_ID"] = request.spec.array.array_id
        env["DISPATCH_ARRAY_INDEX"] = str(request.spec.array.index)
        env["DISPATCH_ARRAY_SIZE"] = str(request.spec.array.size)
    env.update(request.spec.environment)
    return env


@functools.cache
def _devnull() -> int:
    """Return this process's descriptor of /dev/null, every job's stdin without ``In``."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _open_output(workdir: Path, name: str, run_as: RunAs | None) -> int:
    path = workdir / name
    if "/" in name and not path.parent.exists():  # Out/Err may name a subdirectory
        path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    if run_as is not None:
        os.fchown(fd, run_as.uid, run_as.gid)
    return fd


def _chown_tree(root: Path, run_as: RunAs) -> None:
    os.chown(root, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), run_as.uid, run_as.gid)
