"""A helper process that starts jobs as the unprivileged account, for a root worker.

A root worker must switch each job to ``--user``, and switching IDs in the child
rules out ``vfork``: CPython's ``subprocess`` then copies the worker's page tables with
a real ``fork`` (about 2 ms more per job than ``posix_spawn``; docs/benchmarks.md).
Instead, the worker starts one small helper when it starts, already switched to the
account, and the helper starts every job with ``posix_spawn``: the job runs as the
account, exactly as before, without a fork of the worker.

The two talk over a ``SOCK_SEQPACKET`` socket pair, one JSON object a message:

- worker -> helper: ``{"argv", "env", "cwd"}`` with the job's stdin, stdout and stderr
  descriptors attached (``SCM_RIGHTS``; the worker opened them, as before);
- helper -> worker: ``{"op": "ready"}`` once, then ``{"op": "spawned", "pid"}`` with the
  job's pidfd attached, or
  ``{"op": "failed", "errno", "strerror"}`` for each request, and
  ``{"op": "exited", "pid", "code"}`` when a job ends (the helper is its parent).

The worker still watches each job through a pidfd (the helper's, passed over: one
opened by the worker could come too late, after the helper reaped the job), signals
its process group itself, and learns its exit status from the helper's report.

The helper starts as root with an empty environment, imports what it needs (the
interpreter may live where the account cannot read), then drops to the account for
good and makes itself non-dumpable, so the jobs, which share its account, can neither
trace it nor read its memory; it holds no descriptor but its socket. If it dies, the
jobs it started are killed and reported so, and the worker starts another helper for
the next job.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dispatch.errors import DispatchError
from workers.spawn import Account, spawn

log = logging.getLogger(__name__)

#: Largest request: a job's argv and environment (its headers fit one AMQP frame).
MAX_MESSAGE_BYTES = 1 << 20
START_TIMEOUT_S = 10.0
#: How long the worker waits for an answer it knows is coming (a spawn, an exit).
ANSWER_TIMEOUT_S = 5.0
_FDS_PER_JOB = 3
_FD_SPACE = socket.CMSG_SPACE(_FDS_PER_JOB * array.array("i").itemsize)
_PR_SET_DUMPABLE = 4
_SO_SNDBUFFORCE = 32  # Linux; not exported by the socket module


class SpawnerError(DispatchError):
    """Raised when the helper cannot start or stops answering; the runner handles it."""


class HelperProcess:
    """A job started by the helper: the worker watches it, the helper reaps it."""

    def __init__(self, pid: int, pidfd: int, spawner: Spawner) -> None:
        self.pid = pid
        #: Becomes readable when the job exits; the caller that watches it closes it.
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._spawner = spawner

    def poll(self) -> int | None:
        """Return the exit status (negative: killed by that signal), or None while running."""
        if self.returncode is None:
            self.returncode = self._spawner.exit_status(self.pid, self.pidfd)
        return self.returncode


class Spawner:
    """The worker's side of the helper: sends jobs to start, collects their exits."""

    def __init__(self, account: Account) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A datagram may be as large as the sender's buffer, which SO_SNDBUF caps at
        # net.core.wmem_max (208 KiB by default); root may force it past that.
        try:
            ours.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, MAX_MESSAGE_BYTES)
        except PermissionError:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE_BYTES)
        self._sock = ours
        self._exited: dict[int, int] = {}
        #: Jobs started and not yet reported: killed should the helper die.
        self._started: set[int] = set()
        self._gone = False
        self._serving = False
        root = str(Path(__file__).resolve().parent.parent)
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from workers.spawner import serve; "
                f"serve({theirs.fileno()}, {account.uid}, {account.gid})")
        try:
            self._proc = subprocess.Popen(
                helper_command(code), pass_fds=(theirs.fileno(),), env={}, cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise SpawnerError(f"cannot start the job spawner as {account.name}: {exc}") from None
        finally:
            theirs.close()
        hello, _ = self._read(START_TIMEOUT_S)
        if hello is None or hello.get("op") != "ready":
            self.close()
            raise SpawnerError(f"the job spawner did not start as {account.name}")
        self._serving = True
        self.helper_pid: int = self._proc.pid

    @property
    def alive(self) -> bool:
        """Tell whether the helper still answers (it may have died since)."""
        return not self._gone

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], stdin: int,
              stdout: int, stderr: int) -> HelperProcess:
        """Start ``argv`` through the helper; raise OSError when the command cannot run.

        Raises SpawnerError when the helper is gone or stopped answering; the job does
        not run then (anything a hung helper started for it is killed first).
        """
        if self._gone:
            raise SpawnerError("the job spawner is gone")
        # UTF-8, not \u escapes: a request stays about the size of the job's headers.
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd)},
                             ensure_ascii=False).encode("utf-8", "surrogatepass")
        attached = array.array("i", (stdin, stdout, stderr))
        try:
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, attached)])
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # the job's own fault, not the helper's
                raise
            self._lose(f"cannot reach it: {exc}")
            raise SpawnerError("the job spawner is gone") from None
        while True:
            answer, fds = self._read(ANSWER_TIMEOUT_S)
            if answer is None:
                # Stopped, or stuck in an exec from a hung file system: it may have
                # started this job without saying so. Kill it, then whatever already
                # runs in the job's fresh directory, so the retry is the only run.
                self._lose("it stopped answering")
                self._proc.kill()
                self.close()
                strays = kill_processes_in(cwd)
                if strays:
                    log.error("job spawner stopped answering after starting %s in %s; "
                              "killed", ", ".join(map(str, strays)), cwd)
                raise SpawnerError("the job spawner stopped answering")
            if answer["op"] == "exited":
                self._note_exit(answer)
            elif answer["op"] == "spawned":
                pid = int(answer["pid"])
                self._started.add(pid)
                if len(fds) == 1:
                    return HelperProcess(pid, fds[0], self)
                for fd in fds:
                    os.close(fd)
                self._killed(pid)  # a job the worker cannot watch must not run unseen
                raise OSError(errno.EMFILE, "no descriptor left to watch the job")
            elif answer["op"] == "failed":
                raise OSError(int(answer["errno"]), str(answer["strerror"]))

    def exit_status(self, pid: int, pidfd: int) -> int | None:
        """Return ``pid``'s exit status once the helper reports it, else None.

        Once the job is seen to have exited (its pidfd is readable), waits for the
        helper's report, which is on its way. A job whose helper died is killed.
        """
        self._collect(0)
        if pid in self._exited:
            return self._exited.pop(pid)
        if self._gone:
            return self._killed(pid)
        if not select.select([pidfd], [], [], 0)[0]:
            return None  # still running
        self._collect(ANSWER_TIMEOUT_S, until=pid)
        if pid in self._exited:
            return self._exited.pop(pid)
        return self._killed(pid) if self._gone else None

    def check(self) -> bool:
        """Take the exit reports waiting; return False once the helper is gone.

        The worker calls this now and then: a helper that died is noticed, and the jobs
        it started are killed at once rather than when they end.
        """
        self._collect(0)
        return not self._gone

    def close(self) -> None:
        """Let the helper go: it exits when its socket closes."""
        if self._sock.fileno() >= 0:
            self._sock.close()
        try:
            self._proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._gone = True

    def _collect(self, timeout_s: float, *, until: int | None = None) -> None:
        """Take the exit reports waiting, or wait up to ``timeout_s`` for ``until``'s."""
        while not self._gone:
            answer, fds = self._read(timeout_s if until is not None else 0)
            for fd in fds:  # none expected here
                os.close(fd)
            if answer is None:
                return
            if answer.get("op") == "exited" and self._note_exit(answer) == until:
                return

    def _note_exit(self, answer: dict[str, Any]) -> int:
        """Keep a reported exit status until the job's poll asks; return the job's pid."""
        pid = int(answer["pid"])
        self._exited[pid] = int(answer["code"])
        self._started.discard(pid)
        return pid

    def _read(self, timeout_s: float) -> tuple[dict[str, Any] | None, list[int]]:
        """Return the next answer and the descriptors it carries; None when none came."""
        if self._gone:
            return None, []
        try:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    65536, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                if not timeout_s or not select.select([self._sock], [], [], timeout_s)[0]:
                    return None, []
                data, ancillary, _, _ = self._sock.recvmsg(
                    65536, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:
            self._lose(str(exc))
            return None, []
        fds = _descriptors(ancillary)
        if not data:
            self._lose("it exited")
            return None, fds
        answer: dict[str, Any] = json.loads(data)
        return answer, fds

    def _lose(self, why: str) -> None:
        """Take the helper for dead (its jobs' exits can no longer be learnt)."""
        if self._gone:
            return
        self._gone = True
        if self._serving:
            log.error("job spawner (pid %s): %s; its running jobs are killed", self._proc.pid,
                      why)
        for pid in self._started:
            self._killed(pid)

    def _killed(self, pid: int) -> int:
        """Kill a job whose helper died (nobody can report its exit now): -SIGKILL."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return -signal.SIGKILL


def kill_processes_in(directory: Path) -> list[int]:
    """SIGKILL every process whose working directory is ``directory``; return their pids.

    Used for a job directory, fresh and the job's alone: whatever runs there is that job
    (a process stuck in exec included: the kill lands before its program runs).
    """
    target = os.path.realpath(directory)  # /proc shows the resolved path
    killed: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/cwd") != target:
                continue
            pid = int(name)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue  # gone meanwhile, or not ours to see
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # a job leads its own process group
        killed.append(pid)
    return killed


def helper_command(code: str) -> list[str]:
    """Return the command that runs the helper: this interpreter, isolated from PYTHON*."""
    return [sys.executable, "-I", "-c", code]


# -- the helper's side -------------------------------------------------------------------

def serve(fd: int, uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good, then start jobs asked for on socket ``fd``."""
    _become(uid, gid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    if not _send(sock, {"op": "ready"}):
        return
    while True:
        for key, _ in selector.select():
            if key.data is None:
                if not _serve_request(sock, selector):
                    return
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            _, status = os.waitpid(key.data, 0)
            if not _send(sock, {"op": "exited", "pid": key.data,
                                "code": os.waitstatus_to_exitcode(status)}):
                return


def _serve_request(sock: socket.socket, selector: selectors.BaseSelector) -> bool:
    """Start one job; return False when the worker has gone."""
    try:
        data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES, _FD_SPACE,
                                                 socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return False
    fds = _descriptors(ancillary)
    if not data and not fds:
        return False
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != _FDS_PER_JOB:
            raise OSError(errno.EMSGSIZE, "Message too long")
        request = json.loads(data.decode("utf-8", "surrogatepass"))
        pid = spawn(list(request["argv"]), cwd=Path(request["cwd"]), env=dict(request["env"]),
                    stdin=fds[0], stdout=fds[1], stderr=fds[2], account=None).pid
    except OSError as exc:
        return _send(sock, {"op": "failed", "errno": exc.errno or errno.EIO,
                            "strerror": exc.strerror or str(exc)})
    except (ValueError, KeyError, TypeError) as exc:
        return _send(sock, {"op": "failed", "errno": errno.EINVAL, "strerror": str(exc)})
    finally:
        for fd in fds:
            os.close(fd)
    pidfd = os.pidfd_open(pid)
    selector.register(pidfd, selectors.EVENT_READ, pid)
    return _send(sock, {"op": "spawned", "pid": pid}, pidfd)


def _send(sock: socket.socket, message: dict[str, Any], fd: int | None = None) -> bool:
    data = json.dumps(message).encode()
    try:
        if fd is None:
            sock.send(data)
        else:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", (fd,)))])
    except OSError:
        return False
    return True


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _become(uid: int, gid: int) -> None:
    """Drop root for the account, with no way back, and keep the jobs from tracing us."""
    import ctypes  # noqa: PLC0415 - only the helper needs it

    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(f"cannot become {uid}:{gid}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
