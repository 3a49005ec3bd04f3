"""Running jobs on SSH hosts: the runner and running job of ``dispatch worker --ssh-hosts``.

:class:`RemoteRunner` and :class:`RemoteJob` stand where :class:`~workers.runner.Runner`
and :class:`~workers.running.RunningJob` stand on a daemon node, so the node's job
flow is the same. Each job is one session channel on its host's connection, running
:mod:`workers.hostside` under the host's python3: the job goes in on the channel's
stdin (as JSON, then the input zip), the zipped working directory comes back on its
stdout and a status line on its stderr. The channel's ``fileno()`` is what the node's
selector waits on, so no thread runs per job. The time limit is enforced on the host;
``kill`` sends ``K`` down the channel. A channel that closes without an exit status
(the host or its connection died) leaves the job :attr:`RemoteJob.lost`.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import paramiko

from dispatch.errors import InvalidMessageError
from dispatch.job import JobRequest
from workers import hostside
from workers.hostpool import HostPool
from workers.runner import Runner, job_environment
from workers.running import Outcome, RunningJob
from workers.spool import Packed, Spool
from workers.sshlink import HostLink

log = logging.getLogger(__name__)

__all__ = ["RemoteJob", "RemoteRunner", "RemoteSpool"]

#: Seconds past the time limit and kill grace before the node itself sends the kill.
BACKSTOP_S = 10.0
MAX_STDERR_BYTES = 64 * 1024
_SCRIPT = Path(hostside.__file__).read_text(encoding="utf-8")


class _NoLocalProcess:
    """The process slot of a RunningJob whose process lives on another host."""

    pid = 0

    def poll(self) -> int | None:
        """Return None: the host, not this process, knows."""
        return None


class RemoteJob(RunningJob):
    """A job running on an SSH host: its channel, its output arriving, its end."""

    def __init__(self, request: JobRequest, link: HostLink, channel: paramiko.Channel,
                 output: IO[bytes], kill_grace_s: float) -> None:
        super().__init__(request, Path(f"/{link.name}"), _NoLocalProcess(), kill_grace_s)
        self.link = link
        self.channel = channel
        self.output = output
        self.size = 0
        #: Why the job was lost with its host (it must run again), else None.
        self.lost: str | None = None
        self._stderr = bytearray()
        self._fd: int = channel.fileno()
        self._done: Outcome | None = None

    def fileno(self) -> int:
        """Return the channel's descriptor: readable when output arrives or it closes."""
        return self._fd

    @property
    def has_pidfd(self) -> bool:
        """Tell that ``fileno`` can be watched (always, for a channel)."""
        return True

    def next_deadline(self) -> float | None:
        """Return when the node should step in: only if the host missed the time limit."""
        if self.deadline is None or self._done is not None:
            return None
        return self.deadline + 2 * self.kill_grace_s + BACKSTOP_S

    def enforce(self, now: float) -> None:
        """Kill the job from here if the host has not ended it well past its limit."""
        backstop = self.next_deadline()
        if backstop is not None and now >= backstop and self.killed_at is None:
            log.warning("job %s: still running on %s past its time limit; killing it",
                        self.request.job_id, self.link.name)
            self.kill()

    def kill(self, *, removed: bool = False) -> None:
        """Ask the host to kill the job's whole process tree (``K`` on the channel)."""
        self.removed = self.removed or removed
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            try:
                self.channel.send(b"K")
            except (OSError, EOFError, paramiko.SSHException):
                log.info("job %s: channel to %s already closed", self.request.job_id,
                         self.link.name)

    def poll(self) -> Outcome | None:
        """Take in what arrived; return the outcome once the channel has closed."""
        if self._done is not None:
            return self._done
        self._drain()
        channel = self.channel
        if not (channel.closed or (channel.eof_received and channel.exit_status_ready())):
            return None
        self._drain()
        duration = time.monotonic() - self.started_mono
        status = self._status() if channel.exit_status_ready() else None
        if status is None:
            self.lost = self._why_lost()
            self._done = Outcome(None, False, None, duration, self.removed, self.lost)
            return self._done
        signo = status.get("exit_signal")
        self._done = Outcome(status.get("exit_code"), signo is not None, signo, duration,
                             self.removed or bool(status.get("removed")), status.get("reason"))
        return self._done

    def _drain(self) -> None:
        channel = self.channel
        while channel.recv_ready():
            data = channel.recv(1 << 16)
            if not data:
                break
            self.output.write(data)
            self.size += len(data)
        while channel.recv_stderr_ready():
            data = channel.recv_stderr(1 << 16)
            if not data:
                break
            self._stderr += data
            del self._stderr[:-MAX_STDERR_BYTES]

    def _status(self) -> dict[str, Any] | None:
        lines = bytes(self._stderr).strip().splitlines()
        try:
            status = json.loads(lines[-1]) if lines else None
        except ValueError:
            status = None
        if self.channel.recv_exit_status() != 0 or not isinstance(status, dict):
            return None
        return status

    def _why_lost(self) -> str:
        if not self.channel.exit_status_ready():
            return f"lost with host {self.link.name}: its channel closed without an exit status"
        tail = bytes(self._stderr).decode("utf-8", "replace").strip()[-500:]
        code = self.channel.recv_exit_status()
        return f"the job wrapper failed on {self.link.name} (exit {code}): {tail}"

    def close(self) -> None:
        """Close the channel (the job has ended, or is given up)."""
        self.channel.close()

    def release(self) -> None:
        """Free the result's memory or spool file."""
        self.channel.close()
        self.output.close()


class RemoteRunner(Runner):
    """Starts jobs on SSH hosts: picks a host, opens a session channel, sends the job."""

    def __init__(self, pool: HostPool, spool_dir: Path, max_result_bytes: int,
                 kill_grace_s: float) -> None:  # no local Runner state: jobs run elsewhere
        self.pool = pool
        self.spool_dir = spool_dir
        self.max_result_bytes = max_result_bytes
        self.kill_grace_s = kill_grace_s
        self._inputs: dict[str, bytes] = {}

    @property
    def helper_pid(self) -> int | None:
        """Return None: there is no local job spawner."""
        return None

    def check_spawner(self) -> None:
        """Do nothing: there is no local job spawner."""

    def close(self) -> None:
        """Close every host's connection."""
        self.pool.close()

    def prepare(self, request: JobRequest, body: bytes) -> Path:
        """Check the job's inputs and keep them for ``start``; return a placeholder path."""
        if getattr(request.spec, "stages", None) is not None:
            raise InvalidMessageError("staged jobs do not run on SSH hosts", field="Stages")
        if getattr(request.spec, "nodes", None) is not None:
            raise InvalidMessageError("multi-node jobs do not run on SSH hosts (their nodes "
                                      "must be execute nodes)", field="MinNodes")
        names = _input_names(body) if body else set()
        stdin = request.spec.stdin
        if stdin and stdin not in names:
            raise InvalidMessageError(f"{stdin!r} is not among the job's input files",
                                      field="In")
        self._inputs[request.job_id] = body
        return Path("/ssh") / request.job_id

    def start(self, request: JobRequest, workdir: Path, *,
              extra_env: Mapping[str, str] | None = None) -> RunningJob:
        """Start ``request`` on the host that fits it; raise OSError if none can now."""
        body = self._inputs.pop(request.job_id, b"")
        link = self.pool.pick(request)
        if link is None:
            raise ConnectionError("no SSH host is up that fits the job")
        host = link.host
        spec = request.spec
        env = job_environment(request, Path(hostside.WORKDIR_MARK))
        job = {"job_id": request.job_id, "scratch_root": host.scratch_root, "env": env,
               "command": spec.command, "arguments": list(spec.arguments),
               "stdin": spec.stdin, "stdout": spec.stdout, "stderr": spec.stderr,
               "time_limit_s": spec.time_limit_s, "kill_signal": int(spec.kill_signal),
               "kill_grace_s": self.kill_grace_s, "input_bytes": len(body)}
        head = json.dumps(job).encode()
        command = f"{shlex.quote(host.python)} -I -c {shlex.quote(_SCRIPT)}"
        try:
            channel = link.open_session(command)
            channel.sendall(b"%d\n%s%s" % (len(head), head, body))
        except (ConnectionError, OSError, EOFError, paramiko.SSHException) as exc:
            link.lost(str(exc))
            raise ConnectionError(f"host {link.name}: {exc}") from None
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        output = tempfile.SpooledTemporaryFile(  # noqa: SIM115  # the job closes it
            max_size=self.max_result_bytes, dir=str(self.spool_dir))
        link.slots.take(spec.resources)
        log.debug("job %s: started on %s", request.job_id, link.name)
        return RemoteJob(request, link, channel, output, self.kill_grace_s)

    def archive(self, job: RunningJob) -> bytes:
        """Return the zip the host sent back."""
        if not isinstance(job, RemoteJob):
            raise TypeError("not a job on an SSH host")
        job.output.seek(0)
        return job.output.read()

    @property
    def untidy(self) -> bool:
        """Return False: no job directory is kept here (the host removes its own)."""
        return False

    def cleanup(self, job: RunningJob) -> None:
        """Give the host's slots back and free what the job held here."""
        if isinstance(job, RemoteJob):
            job.link.slots.give(job.request.spec.resources)
        job.release()


class RemoteSpool(Spool):
    """A spool whose ``pack`` hands on the zip an SSH host made (no zipping here)."""

    def pack(self, job: RunningJob) -> Packed:
        """Return the host's zip of the job's directory, in memory or in the spool."""
        if not isinstance(job, RemoteJob):
            return super().pack(job)
        job.close()
        if not job.size:
            raise ValueError(f"{job.link.name} sent no result zip")
        job.output.seek(0)
        detached = job.output
        job.output = io.BytesIO()  # the reply owns the file now; release() closes this one
        return Packed(self, detached, job.size)


def _input_names(body: bytes) -> set[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InvalidMessageError(f"is not a readable zip: {exc}", field="body") from None
    for name in names:
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise InvalidMessageError(f"member {name!r} would land outside the working "
                                      "directory", field="body")
    return set(names)
