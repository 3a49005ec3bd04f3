"""A node's part in multi-node jobs: starting a job's gang driver, and joining other jobs.

As the **head** (it took a job with ``MinNodes``/``MaxNodes``), the node starts the job's
driver (workers/gang.py) in place of the job's command, as the node's own user, with the
node's broker URL in its environment: the driver gathers the other nodes and runs the
stages. The node watches it as it watches any job.

As a **member**, the node takes node tokens from its pool queues like jobs (the wire
contract is in :mod:`dispatch.gang`). A token it can meet now is joined: its resources
held, the job's key authorized for the node's SSH user, a fresh directory made for the
job's payload, an exclusive hold queue declared, a joined notice sent to the head's
inbox; the token is acked once the notice is routed there (the head then watches the hold
queue, and asks its pool again for a member it loses before the job starts). The node
lets the job go when the head says so (``gang-release``), when the head's inbox is gone
(checked every second) or when its own connection drops (the head sees the hold queue go).
A token it cannot meet now is handed back after a pause, so another node gets it.
Nothing here runs for plain jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dispatch import broker, gang, headers
from dispatch.errors import InvalidMessageError
from dispatch.gang import Member, Token
from dispatch.job import JobRequest, Resources
from workers import gangkeys
from workers.gangplan import BROKER_ENV, Plan, SshAccess
from workers.nodebase import NodeBase, NodeConfig
from workers.runner import job_environment
from workers.running import RunningJob

log = logging.getLogger(__name__)

#: How long a token this node cannot join now stays with it before it goes back.
DEFER_S = 2.0
#: How often a member checks that the heads it serves are still there.
PROBE_S = 1.0
DEFAULT_HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key.pub")


@dataclasses.dataclass
class Hold:
    """A job this node serves as a member: what it holds until the head lets it go."""

    token: Token
    tag: int | None
    resources: Resources
    workdir: Path
    queue: str


class GangMembers(NodeBase):
    """Multi-node jobs on this node, as their head or as a member."""

    def _gang_init(self) -> None:
        self.gang_holds: dict[str, Hold] = {}
        self._gang_deferred: list[tuple[float, int]] = []
        self._gang_next_probe = 0.0
        self._gang_serial = 0
        keys = self.config.ssh_authorized_keys
        if keys is not None and keys.exists():
            removed = gangkeys.remove_keys(keys)
            if removed:
                log.info("removed %d multi-node job keys left in %s", removed, keys)

    def _dead_letter(self, message: Any, job_id: str, reason: str) -> None:
        raise NotImplementedError  # workers/jobflow.py

    def _start_waiting(self) -> None:
        raise NotImplementedError  # workers/jobflow.py

    # -- as the head ----------------------------------------------------------------------

    def _head_ssh(self) -> SshAccess | None:
        cfg = self.config
        if not cfg.ssh_address or cfg.ssh_authorized_keys is None:
            return None
        host, _, port = cfg.ssh_address.rpartition(":")
        return SshAccess(host, int(port), self._ssh_user(),
                         gangkeys.host_key_line(cfg.ssh_host_key or DEFAULT_HOST_KEY),
                         str(cfg.ssh_authorized_keys))

    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config)
        self._gang_init()

    def _start_driver(self, request: JobRequest, workdir: Path, pool: str) -> RunningJob:
        """Start the gang driver of ``request`` (a job with Nodes) in ``workdir``."""
        nodes = request.spec.nodes
        assert nodes is not None  # noqa: S101 -- only multi-node jobs come here
        self._gang_serial += 1
        keydir = workdir.with_name(f".gang-{workdir.name}")
        keydir.mkdir(mode=0o700)
        run_as = self.runner.run_as
        spec = request.spec
        plan = Plan(job_id=request.job_id, attempt=request.attempt, pool=pool,
                    head=self.machine.name, workdir=str(workdir), keydir=str(keydir),
                    reason_file=f"{keydir}.reason", min_nodes=nodes.min, max_nodes=nodes.max,
                    gather_s=nodes.gather_s, bootstrap=nodes.bootstrap, cleanup=nodes.cleanup,
                    argv=[spec.command, *spec.arguments],
                    env=job_environment(request, workdir), stdout=spec.stdout,
                    stderr=spec.stderr, cpus=spec.resources.cpus,
                    memory_mb=spec.resources.memory_mb, disk_mb=spec.resources.disk_mb,
                    requirements=spec.requirements,
                    uid=run_as.uid if run_as else None, gid=run_as.gid if run_as else None,
                    head_ssh=self._head_ssh(), kill_grace_s=self.config.kill_grace_s)
        if run_as is not None:
            os.chown(keydir, run_as.uid, run_as.gid)
        plan_file = Path(f"{keydir}.plan")
        plan.dump(plan_file)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               BROKER_ENV: self.config.broker_url}
        for name in ("DISPATCH_QUEUE_TYPE", "PYTHONPATH", "HOME", "LANG"):
            if name in os.environ:
                env[name] = os.environ[name]
        proc = subprocess.Popen([sys.executable, "-m", "workers.gang", str(plan_file)],
                                cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        return RunningJob(request, workdir, proc, self.config.kill_grace_s,
                          gang_files=(Path(plan.reason_file), plan_file, keydir))

    # -- as a member ----------------------------------------------------------------------

    def _ssh_user(self) -> str:
        if self.config.ssh_user:
            return self.config.ssh_user
        run_as = self.runner.run_as
        return run_as.name if run_as is not None else _current_user()

    def _gang_token(self, message: Any) -> None:
        """Join the job a node token is for, or hand the token back for another node."""
        tag = message.delivery_tag
        try:
            token = gang.read_token(message.properties, message.headers or {})
            request = _token_request(token, message.headers or {})
        except InvalidMessageError as exc:
            self._dead_letter(message, str(message.properties.get("message_id") or "token"),
                              f"not a valid node token: {exc.reason}")
            return
        why = self._cannot_join(token, request)
        if why is not None:
            log.debug("token %s: %s; handing it back in %.0f s", token.token_id, why, DEFER_S)
            self._gang_deferred.append((time.monotonic() + DEFER_S, tag))
            return
        self._join(token, request, tag)

    def _cannot_join(self, token: Token, request: JobRequest) -> str | None:
        cfg = self.config
        if self.stopping:
            return "the node is stopping"
        if not cfg.ssh_address or cfg.ssh_authorized_keys is None:
            return "this node has no --ssh-address and --ssh-authorized-keys"
        if token.job_id in self.gang_holds or token.job_id in self.running:
            return "this node is already one of the job's nodes"
        unmet = self._unmet(request)
        if unmet is not None:
            return unmet
        if not self._fits_now(request):
            return "no free slot"
        return None

    def _join(self, token: Token, request: JobRequest, tag: int) -> None:
        cfg = self.config
        assert cfg.ssh_address and cfg.ssh_authorized_keys  # noqa: S101 -- _cannot_join
        res = request.spec.resources
        try:
            workdir = self.runner.prepare(request, b"")
        except (OSError, InvalidMessageError) as exc:  # this node's fault: another may join
            log.error("job %s: cannot make a directory to join it: %s", token.job_id, exc)
            self._gang_deferred.append((time.monotonic() + DEFER_S, tag))
            return
        host, _, port = cfg.ssh_address.rpartition(":")
        queue = gang.hold_queue(token.job_id, self.machine.name)
        try:
            gangkeys.add_key(cfg.ssh_authorized_keys, token.key, token.job_id)
            member = Member(node=self.machine.name, token_id=token.token_id, ssh_host=host,
                            ssh_port=int(port), ssh_user=self._ssh_user(),
                            host_key=gangkeys.host_key_line(cfg.ssh_host_key or DEFAULT_HOST_KEY),
                            cpus=res.cpus, workdir=str(workdir), hold_queue=queue)
        except (OSError, ValueError) as exc:
            log.error("job %s: cannot join as a member: %s", token.job_id, exc)
            shutil.rmtree(workdir, ignore_errors=True)
            gangkeys.remove_keys(cfg.ssh_authorized_keys, token.job_id)
            self._gang_deferred.append((time.monotonic() + DEFER_S, tag))
            return
        channel = self._channel()
        channel.queue_declare(queue, exclusive=True, auto_delete=True, durable=False)
        self.slots.take(res)
        self.gang_holds[token.job_id] = Hold(token, tag, res, workdir, queue)
        job_id = token.job_id

        def settled(ok: bool) -> None:
            # The head has the notice: from now on it watches this node's hold queue (and
            # asks its pool again if the queue goes before the job starts), so the token
            # is acked now, not held unacked for the whole job (consumer_timeout).
            hold = self.gang_holds.get(job_id)
            if not ok:
                self._gang_release(job_id, "the job's head is gone")
            elif hold is not None and hold.tag is not None:
                self._channel().basic_ack(hold.tag)
                hold.tag = None

        self._replies.confirms.publish(
            broker.message(member.encode(), {}, content_type="application/x-msgpack",
                           message_id=token.token_id),
            "", token.inbox, mandatory=True, on_settled=settled, settle_returned_as_failed=True)
        log.info("job %s: joined as a member (head %s)", job_id, token.head)

    def _gang_release(self, job_id: str, why: str, *, ack: bool = True) -> None:
        """Let a job this node serves as a member go: revoke its key, free what it held."""
        hold = self.gang_holds.pop(job_id, None)
        if hold is None:
            return
        _kill_in(hold.workdir)
        keys = self.config.ssh_authorized_keys
        if keys is not None:
            with contextlib.suppress(OSError):
                gangkeys.remove_keys(keys, job_id)
        shutil.rmtree(hold.workdir, ignore_errors=True)
        self.slots.give(hold.resources)
        if ack:
            with contextlib.suppress(*broker.CONNECTION_ERRORS):
                channel = self._channel()
                channel.queue_delete(hold.queue)
                if hold.tag is not None:
                    channel.basic_ack(hold.tag)
        log.info("job %s: released as a member: %s", job_id, why)
        if ack:
            self._start_waiting()

    def _gang_tick(self) -> None:
        """Hand back deferred tokens that are due; let go of jobs whose head is gone."""
        if not self.gang_holds and not self._gang_deferred:
            return
        now = time.monotonic()
        if self._gang_deferred:
            due = [tag for when, tag in self._gang_deferred if when <= now]
            self._gang_deferred = [(w, t) for w, t in self._gang_deferred if w > now]
            for tag in due:
                self._channel().basic_reject(tag, requeue=True)
        if self.gang_holds and now >= self._gang_next_probe:
            self._gang_next_probe = now + PROBE_S
            for job_id, hold in list(self.gang_holds.items()):
                if not broker.queue_held(self._connection(), hold.token.inbox):
                    self._gang_release(job_id, "its head is gone")

    def _gang_reset(self) -> None:
        """Forget what the last connection held: the broker gave its tokens back."""
        for job_id in list(self.gang_holds):
            self._gang_release(job_id, "the broker connection was lost", ack=False)
        self._gang_deferred.clear()


def _token_request(token: Token, raw: Any) -> JobRequest:
    """Return a job request standing for what a token asks of a node (for matching)."""
    carried = {name: raw[name] for name in gang.CARRIED if name in raw}
    return headers.decode_request({"message_id": token.token_id},
                                  {**carried, headers.CMD: "gang-member"})


def _current_user() -> str:
    import pwd  # noqa: PLC0415

    return pwd.getpwuid(os.getuid()).pw_name


def _kill_in(workdir: Path) -> None:
    """Kill what the job's stages left running in a member's directory."""
    root = str(workdir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
