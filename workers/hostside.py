"""The job's side on an SSH host: sent as ``python3 -c`` over one SSH channel per job.

Standalone and stdlib-only (it runs on hosts where Dispatch is not installed, with any
python3 from 3.8). It reads from stdin the job as JSON (after its length on a line of
its own) and the input zip, makes a fresh directory under the host's scratch root,
unpacks the zip there, starts the command in a session of its own with Out/Err as
files, and waits for it, enforcing the time limit on the host. Becoming a child
subreaper first, it sees every process the job leaves behind, even after setsid, and
kills them all when the job ends. A ``K`` on stdin (``dispatch rm``) or stdin's end
(the SSH connection is gone) kills the job too. Then it writes the zipped directory to
stdout and one JSON status line to stderr, and removes the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
SCRATCH_ENV = ("HOME", "TMPDIR", "_CONDOR_SCRATCH_DIR")
#: Stands for the job's directory in the environment the node sends.
WORKDIR_MARK = "@WORKDIR@"


def main() -> int:
    """Run one job as the node asked on stdin; return the wrapper's exit status."""
    size = b""
    while not size.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise EOFError("no job on stdin")
        size += byte
    job: dict[str, Any] = json.loads(_read_exactly(int(size)))
    data = _read_exactly(int(job["input_bytes"]))
    os.makedirs(job["scratch_root"], mode=0o700, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=job["job_id"][:40] + ".", dir=job["scratch_root"])
    try:
        if data:
            _unpack(data, workdir)
        status = _run(job, workdir)
        _send_zip(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stderr.write("\n" + json.dumps(status) + "\n")
    sys.stderr.flush()
    return 0


def _read_exactly(size: int) -> bytes:
    """Read ``size`` bytes of stdin, unbuffered: what follows them is control (``K``)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the job's input was cut short")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _unpack(data: bytes, workdir: str) -> None:
    import io  # noqa: PLC0415  # only jobs with inputs need it

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = info.filename
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or "\\" in name:
                raise ValueError(f"unsafe member {name!r} in the input zip")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                continue  # a symlink: never followed, never made
            archive.extract(info, workdir)


def _run(job: dict[str, Any], workdir: str) -> dict[str, Any]:
    env = {k: (workdir if v == WORKDIR_MARK else v) for k, v in job["env"].items()}
    out = _open_output(workdir, job["stdout"])
    err = out if job["stderr"] == job["stdout"] else _open_output(workdir, job["stderr"])
    stdin = os.open(os.path.join(workdir, job["stdin"]) if job.get("stdin") else os.devnull,
                    os.O_RDONLY)
    _become_subreaper()
    argv = [job["command"], *job["arguments"]]
    pid = os.fork()
    if pid == 0:  # the job: its own session, cwd and files, then exec
        try:
            os.setsid()
            os.chdir(workdir)
            for fd, target in ((stdin, 0), (out, 1), (err, 2)):
                os.dup2(fd, target)
            os.closerange(3, 65536)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)  # noqa: S606  # the job's argv, as given
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            os.write(2, f"dispatch: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
            os._exit(code)
    for fd in {stdin, out, err}:
        os.close(fd)
    return _wait(job, pid)


def _wait(job: dict[str, Any], pid: int) -> dict[str, Any]:
    limit = job.get("time_limit_s")
    deadline = time.monotonic() + limit if limit else None
    grace = float(job.get("kill_grace_s") or 5.0)
    killed_at: float | None = None
    removed = reached = False
    control = 0
    woken, wake = os.pipe()  # SIGCHLD writes here: the job's end wakes the loop at once
    os.set_blocking(wake, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if killed_at is None and deadline is not None and now >= deadline:
            reached = True
            killed_at = _kill(pid, int(job["kill_signal"]))
        elif killed_at is not None and now >= killed_at + grace:
            killed_at = _kill(pid, signal.SIGKILL)
        watched = [woken, control] if control >= 0 else [woken]
        ready, _, _ = select.select(watched, [], [], 0.5)
        if woken in ready:
            os.read(woken, 512)
        if control in ready:
            byte = os.read(control, 1)
            if not byte:  # the node's connection is gone: so is the job
                control = -1
            if killed_at is None:
                removed = removed or byte == b"K"
                killed_at = _kill(pid, int(job["kill_signal"]))
    _kill_leftovers()
    result: dict[str, Any] = {"removed": removed}
    if os.WIFSIGNALED(status):
        result.update(exit_code=None, exit_signal=os.WTERMSIG(status))
    else:
        result.update(exit_code=os.WEXITSTATUS(status), exit_signal=None)
    if reached:
        result["reason"] = f"time limit of {limit}s reached"
    return result


def _kill(pid: int, sig: int) -> float:
    """Signal the job's session and every process descended from this wrapper."""
    escaped = _descendants(os.getpid())
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)
    for child in escaped:
        with contextlib.suppress(OSError):
            os.kill(child, sig)
    return time.monotonic()


def _kill_leftovers() -> None:
    """SIGKILL and reap whatever the job left (orphans came to this subreaper)."""
    for _ in range(50):
        left = _descendants(os.getpid())
        if not left:
            return
        for child in left:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _become_subreaper() -> None:
    # Not Linux: leftovers that left the session are not found.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _open_output(workdir: str, name: str) -> int:
    path = os.path.join(workdir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)


def _send_zip(workdir: str) -> None:
    out = sys.stdout.buffer
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for dirpath, dirnames, filenames in os.walk(workdir):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                archive.write(path, os.path.relpath(path, workdir))
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
