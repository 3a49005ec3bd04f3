"""The stages of a multi-node job on each of its nodes: the head's own, and a member's over SSH.

Used by the gang driver (workers/gang.py), one thread a node for each stage. The head's
stages run as local processes in the job's working directory; a member's run through an
SSH login with the job's key (fabric, the member's host key pinned), in the directory the
member made for the job. Each node's output goes to ``logs/<node>.out`` and ``.err`` in
the head's working directory, its copy-back directory to ``copyback/<node>.tar.gz``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dispatch.gang import Member
from workers.gangplan import HEAD_COPYBACK, PAYLOAD, GangFailed, Plan, SshAccess

if TYPE_CHECKING:
    from workers.gang import Driver

class Local:
    """The head's own part of the stages."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        plan = driver.plan
        address = (f"{plan.head_ssh.host}:{plan.head_ssh.port}" if plan.head_ssh
                   else "(no sshd)")
        self.out = driver.workdir / "logs" / f"{plan.head}.out"
        self.err = driver.workdir / "logs" / f"{plan.head}.err"
        for path in (self.out, self.err):
            path.write_text(f"# node {plan.head} {address} (head)\n", encoding="utf-8")

    def note(self, text: str) -> None:
        """Add a line of the driver's own to the head's log."""
        with self.out.open("a", encoding="utf-8") as out:
            out.write(text)

    def stage(self, name: str, script: str) -> None:
        """Run bootstrap or cleanup on the head; raise GangFailed when it fails."""
        driver, plan = self.driver, self.driver.plan
        self.note(f"## {name}\n")
        with self.out.open("ab") as out, self.err.open("ab") as err:
            out.flush()
            proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=driver.workdir,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True,
                                    env=driver.env_for(str(driver.workdir),
                                                    str(driver.workdir / HEAD_COPYBACK),
                                                    plan.head),
                                    **account(plan))
            try:
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    kill_group(proc, plan.kill_grace_s)
        self.note(f"## {name} exited {code}\n")
        if code != 0:
            raise GangFailed(f"{name} failed on node {plan.head} (exit {code})")

    def copy_back(self) -> None:
        """Pack the head's copy-back directory as ``copyback/<head>.tar.gz``."""
        driver = self.driver
        source = driver.workdir / HEAD_COPYBACK
        with tarfile.open(driver.workdir / "copyback" / f"{driver.plan.head}.tar.gz",
                          "w:gz") as tar:
            tar.add(source, arcname=".")
        shutil.rmtree(source, ignore_errors=True)


class Remote:
    """One member's part of the stages, over SSH (fabric) with the job's key."""

    _open: ClassVar[set[Remote]] = set()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, driver: Driver, member: Member) -> None:
        self.driver = driver
        self.member = member
        self.conn: Any = None
        self.out = driver.workdir / "logs" / f"{member.node}.out"
        self.err = driver.workdir / "logs" / f"{member.node}.err"
        for path in (self.out, self.err):
            path.write_text(f"# node {member.node} {member.ssh_host}:{member.ssh_port}\n",
                            encoding="utf-8")

    def open(self, payload: Path) -> None:
        """Log in to the member and unpack the payload in its directory for the job."""
        from workers.cloud.bootstrap import Target, connection  # noqa: PLC0415 (fabric)

        member = self.member
        self.conn = connection(Target(member.ssh_host, member.ssh_port, member.ssh_user,
                                      self.driver.keydir / "id_ed25519",
                                      self.driver.keydir / "known_hosts"))
        with Remote._lock:
            Remote._open.add(self)
        try:
            self.conn.open()
            wd = shlex.quote(member.workdir)
            self.conn.put(str(payload), f"{member.workdir}/{PAYLOAD}")
            self._run(f"cd {wd} && tar -xf {PAYLOAD} && rm -f {PAYLOAD} && mkdir -p copyback",
                      "payload")
        except GangFailed:
            raise
        except Exception as exc:
            raise GangFailed(f"cannot reach node {member.node} over SSH at "
                             f"{member.ssh_host}:{member.ssh_port}: {exc}") from None

    def _run(self, command: str, what: str) -> int:
        result = self.conn.run(command, hide=True, warn=True, in_stream=False)
        with self.out.open("a", encoding="utf-8") as out:
            out.write(result.stdout)
        with self.err.open("a", encoding="utf-8") as err:
            err.write(result.stderr)
        code = int(result.exited)
        if code != 0:
            raise GangFailed(f"{what} failed on node {self.member.node} (exit {code})")
        return code

    def stage(self, name: str, script: str) -> None:
        """Run bootstrap or cleanup on the member; raise GangFailed when it fails."""
        member = self.member
        env = self.driver.env_for(member.workdir, f"{member.workdir}/copyback", member.node)
        env = {k: v for k, v in env.items()
               if k not in ("DISPATCH_HOSTFILE", "DISPATCH_SSH_CONFIG", "DISPATCH_WORKDIRS",
                            "OMPI_MCA_plm_rsh_args")}
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        with self.out.open("a", encoding="utf-8") as out:
            out.write(f"## {name}\n")
        command = (f"cd {shlex.quote(member.workdir)} && env {assignments} "
                   f"/bin/sh -c {shlex.quote(script)}")
        try:
            self._run(command, name)
        finally:
            with self.out.open("a", encoding="utf-8") as out:
                out.write(f"## {name} ended\n")

    def copy_back(self) -> None:
        """Fetch the member's copy-back directory as ``copyback/<member>.tar.gz``."""
        member = self.member
        remote = f"{member.workdir}/.dispatch-copyback.tar.gz"
        self._run(f"cd {shlex.quote(member.workdir)} && mkdir -p copyback && "
                  f"tar -czf {shlex.quote(remote)} -C copyback .", "copy-back")
        self.conn.get(remote, str(self.driver.workdir / "copyback" / f"{member.node}.tar.gz"))

    def close(self) -> None:
        """Close the SSH connection (a stage still running there ends)."""
        with Remote._lock:
            Remote._open.discard(self)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()

    @classmethod
    def abort_all(cls) -> None:
        """Close every open SSH connection: a stage still running there ends."""
        with cls._lock:
            remotes = list(cls._open)
        for remote in remotes:
            remote.close()


def access(member: Member) -> SshAccess:
    """Return how the job's nodes reach ``member``."""
    return SshAccess(member.ssh_host, member.ssh_port, member.ssh_user, member.host_key)


def known_name(ssh: SshAccess) -> str:
    """Return the known_hosts name of an sshd (``[host]:port`` off port 22)."""
    return ssh.host if ssh.port == 22 else f"[{ssh.host}]:{ssh.port}"


def account(plan: Plan) -> dict[str, Any]:
    """Return the Popen arguments that run a stage as the job's account."""
    if plan.uid is None or plan.uid == os.getuid():
        return {}
    return {"user": plan.uid, "group": plan.gid, "extra_groups": []}


def open_append(path: Path, plan: Plan) -> int:
    """Open a file of the job's for appending, owned by the job's account."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    if plan.uid is not None and plan.gid is not None:
        os.fchown(fd, plan.uid, plan.gid)
    return fd


def kill_group(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM a stage's process group, SIGKILL it after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return
