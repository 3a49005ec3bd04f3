"""The driver of a multi-node job: gathers its nodes, runs its three stages, lets them go.

The head node (the one that took the job) runs ``python -m workers.gang PLAN`` as the
job's process, with the node's own broker URL in ``DISPATCH_GANG_BROKER`` (never in a
file, never passed on to a stage). The node watches it like any job: its exit code is
the job's, a reason it leaves in the plan's ``reason_file`` becomes the reply's Reason,
and a remove or a time limit signals it (SIGTERM, then SIGKILL).

In order (the wire contract is in :mod:`dispatch.gang`):

1. Make the job's SSH key pair; authorize it on the head's own sshd, if it has one.
2. Declare the job's exclusive gang inbox and publish ``MaxNodes - 1`` node tokens to
   the pool; say how many nodes it holds in ``job.gathering`` events (the ledger keeps
   them for ``dispatch explain``; the cloud plane provisions the shortfall).
3. Start once ``MinNodes`` are held: at once with ``MaxNodes``, else after ``GatherTime``.
4. Copy the payload (the job's inputs) to every member, run ``bootstrap`` on every
   node, the job's command on the head with ``$DISPATCH_HOSTFILE`` (``alias slots=N``
   lines, as ``mpirun --hostfile`` reads) and ``$DISPATCH_SSH_CONFIG`` (every alias with
   its address, port, user, the job's key and the node's host key), then ``cleanup`` on
   every node; each node's copy-back directory comes back as ``copyback/<node>.tar.gz``
   and its stage output as ``logs/<node>.out`` and ``logs/<node>.err``.
5. Let every member go (a ``gang-release`` order each), remove the key everywhere.

Members are watched all along by their hold queues: one that disappears means its node
died or lost the broker, and the job fails naming it; the others are let go.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import amqp

from dispatch import broker, events, gang, topology
from dispatch.errors import InvalidMessageError
from dispatch.events import ControlOp, Event
from dispatch.gang import Member
from workers import gangkeys
from workers.gangplan import BROKER_ENV, HEAD_COPYBACK, PAYLOAD, GangFailed, Plan, SshAccess
from workers.gangstages import Local, Remote, access, account, kill_group, known_name, open_append

log = logging.getLogger("workers.gang")

#: How often members' hold queues are checked, and gathering events repeated.
PROBE_S = 1.0
GATHERING_EVERY_S = 30.0

__all__ = ["BROKER_ENV", "Driver", "GangFailed", "Plan", "SshAccess", "main"]


class Driver:
    """One multi-node job, from gathering to release."""

    def __init__(self, plan: Plan, url: str) -> None:
        self.plan = plan
        self.workdir = Path(plan.workdir)
        self.keydir = Path(plan.keydir)
        self.conn = broker.connect(url)
        self.channel = self.conn.channel()
        self.confirms = broker.Confirms(self.channel)
        self.inbox = gang.inbox_queue(plan.job_id)
        self.channel.queue_declare(self.inbox, exclusive=True, auto_delete=True, durable=False)
        self.channel.basic_consume(self.inbox, callback=self._notice, no_ack=True)
        self.members: list[Member] = []
        self.lost: Member | None = None
        self.started = False
        self.stopped: str | None = None
        self.public_key = ""
        self._next_probe = 0.0
        self._sent_held = 0
        self._sent_at = 0.0
        self._tokens = 0
        self._token_headers: dict[str, Any] = {}

    # -- the job ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the job; return its exit code (the reason, if any, is in the reason file)."""
        code, reason = 1, None
        try:
            self._make_key()
            self._publish_tokens()
            self._gather()
            self.started = True
            self._say_gathering(force=True)
            self._write_access()
            code = self._stages()
        except GangFailed as exc:
            code, reason = exc.code, exc.reason
        finally:
            self._release_all()
            self._forget_key()
        if reason:
            Path(self.plan.reason_file).write_text(reason[:1000], encoding="utf-8")
            log.info("job %s: %s", self.plan.job_id, reason)
        return code

    def stop(self, why: str) -> None:
        """Ask the driver to stop (SIGTERM: the job was removed or ran out of time)."""
        self.stopped = why

    def _make_key(self) -> None:
        private, self.public_key = gangkeys.new_key_pair(self.plan.job_id)
        key = self.keydir / "id_ed25519"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(private)
        ssh = self.plan.head_ssh
        if ssh is not None and ssh.keys_file:
            gangkeys.add_key(Path(ssh.keys_file), self.public_key, self.plan.job_id)

    def _forget_key(self) -> None:
        ssh = self.plan.head_ssh
        if ssh is not None and ssh.keys_file:
            with contextlib.suppress(OSError):
                gangkeys.remove_keys(Path(ssh.keys_file), self.plan.job_id)
        shutil.rmtree(self.keydir, ignore_errors=True)

    # -- gathering ----------------------------------------------------------------------

    def _publish_tokens(self) -> None:
        plan = self.plan
        carried = {"RequestCpus": plan.cpus, "RequestMemory": plan.memory_mb,
                   "RequestDisk": plan.disk_mb, "Requirements": plan.requirements}
        hdrs = {gang.GANG_OF: plan.job_id, gang.GANG_INBOX: self.inbox,
                gang.GANG_KEY: self.public_key, gang.GANG_HEAD: plan.head,
                **{k: v for k, v in carried.items() if v}}
        self._token_headers = hdrs
        seqs = [self._publish_token() for _ in range(2, plan.max_nodes + 1)]
        for seq in seqs:
            self.confirms.wait_for(seq)

    def _publish_token(self) -> int:
        """Publish one more node token to the pool; return its confirm's sequence number."""
        self._tokens += 1
        exchange = topology.jobs_exchange_for(9, broker.queue_type_in_use())
        msg = broker.message(b"", dict(self._token_headers),
                             message_id=gang.token_id(self.plan.job_id, self._tokens + 1),
                             content_type="application/octet-stream", priority=9)
        return self.confirms.publish(msg, exchange, self.plan.pool)

    def _gather(self) -> None:
        plan = self.plan
        met_at: float | None = None
        while True:
            self._pump(0.25)
            held = 1 + len(self.members)
            now = time.monotonic()
            if held >= plan.max_nodes:
                return
            if held >= plan.min_nodes:
                met_at = met_at if met_at is not None else now
                if now - met_at >= plan.gather_s:
                    return
            else:
                met_at = None
            self._say_gathering()

    def _status(self) -> str:
        plan, held = self.plan, 1 + len(self.members)
        if self.started:
            return f"runs on {held} nodes: {', '.join([plan.head, *self.node_names()[1:]])}"
        if held < plan.min_nodes:
            return (f"holds {held} of the {plan.min_nodes} nodes it needs (aims for "
                    f"{plan.max_nodes}); waits for {plan.min_nodes - held} more from pool "
                    f"{plan.pool}: a node that meets RequestCpus={plan.cpus} and its "
                    "Requirements must be idle, or be provisioned")
        return (f"holds {held} nodes (needs {plan.min_nodes}, aims for {plan.max_nodes}); "
                f"starts within {plan.gather_s} s whether more come or not")

    def _say_gathering(self, *, force: bool = False) -> None:
        held = 1 + len(self.members)
        now = time.monotonic()
        if not force and held == self._sent_held and now - self._sent_at < GATHERING_EVERY_S:
            return
        self._sent_held, self._sent_at = held, now
        plan = self.plan
        body = events.job_event(Event.GATHERING, job_id=plan.job_id, attempt=plan.attempt,
                                pool=plan.pool, node=plan.head, held=held, min=plan.min_nodes,
                                max=plan.max_nodes, cpus=plan.cpus, memory_mb=plan.memory_mb,
                                disk_mb=plan.disk_mb, requirements=plan.requirements,
                                started=self.started, status=self._status())
        msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                             message_id=f"{events.event_id(body)}/{held}")
        self.confirms.publish(msg, topology.events_exchange(),
                              events.routing_key(Event.GATHERING, plan.pool), mandatory=False)
        log.info("job %s: %s", plan.job_id, self._status())

    def _notice(self, msg: amqp.Message) -> None:
        try:
            member = Member.decode(bytes(msg.body))
        except InvalidMessageError as exc:
            log.warning("job %s: ignoring a message in the gang inbox: %s", self.plan.job_id,
                        exc)
            return
        if self.started or self.stopped or 1 + len(self.members) >= self.plan.max_nodes or \
                any(m.node == member.node for m in self.members) or member.node == self.plan.head:
            log.info("job %s: node %s joined when no more were wanted; letting it go",
                     self.plan.job_id, member.node)
            self._release(member, "not needed")
            return
        self.members.append(member)
        log.info("job %s: node %s joined (%d cpus, %s:%d)", self.plan.job_id, member.node,
                 member.cpus, member.ssh_host, member.ssh_port)

    def _pump(self, timeout_s: float) -> None:
        """Take notices and confirms for up to ``timeout_s``; check members; honour a stop."""
        with contextlib.suppress(TimeoutError):
            self.conn.drain_events(timeout=timeout_s)
        if self.stopped:
            raise GangFailed(self.stopped, 128 + signal.SIGTERM)
        if time.monotonic() >= self._next_probe:
            self._next_probe = time.monotonic() + PROBE_S
            for member in list(self.members):
                if not broker.queue_held(self.conn, member.hold_queue):
                    self.members.remove(member)
                    if self.started:
                        self.lost = member
                        raise GangFailed(f"node {member.node} was lost mid-job: its execute "
                                         "node left the broker")
                    log.warning("job %s: node %s left before the job started; asking the "
                                "pool for another", self.plan.job_id, member.node)
                    self._publish_token()

    def node_names(self) -> list[str]:
        """Return the job's nodes, the head first."""
        return [self.plan.head, *(m.node for m in self.members)]

    # -- release ------------------------------------------------------------------------

    def _release(self, member: Member, reason: str) -> None:
        body = events.encode({"op": ControlOp.GANG_RELEASE.value, "job_ids": [self.plan.job_id],
                              "node": member.node, "reason": reason, "by": self.plan.head,
                              "at": events.now()})
        msg = broker.message(body, {}, content_type=events.CONTENT_TYPE,
                             user_id=self.conn.userid,
                             message_id=f"{self.plan.job_id}/gang-release/{member.node}")
        self.confirms.publish(msg, topology.control_exchange(),
                              f"node.{member.node}.{ControlOp.GANG_RELEASE.value}",
                              mandatory=False)

    def _release_all(self) -> None:
        try:
            for member in self.members:
                self._release(member, "the job ended")
            deadline = time.monotonic() + 10
            while self.confirms.outstanding and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    self.conn.drain_events(timeout=0.5)
        except broker.CONNECTION_ERRORS as exc:  # members see the inbox go and let go
            log.warning("job %s: releasing members failed: %s", self.plan.job_id, exc)
        finally:
            broker.release_quietly(self.conn)

    # -- stages -------------------------------------------------------------------------

    def _write_access(self) -> None:
        """Write the hostfile, the SSH config and known_hosts the execute stage uses."""
        plan = self.plan
        key = self.keydir / "id_ed25519"
        hosts, config, known, dirs = [], [], [], []
        nodes: list[tuple[str, SshAccess | None, int, str]] = [
            (plan.head, plan.head_ssh, plan.cpus, plan.workdir)]
        nodes += [(m.node, access(m), m.cpus, m.workdir) for m in self.members]
        for name, ssh, slots, workdir in nodes:
            hosts.append(gang.hostfile_line(name, slots))
            dirs.append(f"{name} {workdir}\n")
            if ssh is None:  # a head without sshd is reached as itself
                config.append(f"Host {name}\n  HostName localhost\n")
                continue
            config.append(f"Host {name}\n  HostName {ssh.host}\n  Port {ssh.port}\n"
                          f"  User {ssh.user}\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                          f"  UserKnownHostsFile {self.keydir / 'known_hosts'}\n"
                          "  StrictHostKeyChecking yes\n  BatchMode yes\n")
            known.append(f"{known_name(ssh)} {ssh.host_key}\n")
        (self.keydir / "hostfile").write_text("".join(hosts), encoding="utf-8")
        (self.keydir / "ssh_config").write_text("".join(config), encoding="utf-8")
        (self.keydir / "known_hosts").write_text("".join(known), encoding="utf-8")
        (self.keydir / "workdirs").write_text("".join(dirs), encoding="utf-8")
        if plan.uid is not None and plan.gid is not None:
            for path in [self.keydir, *self.keydir.iterdir()]:
                os.chown(path, plan.uid, plan.gid)

    def env_for(self, workdir: str, copyback: str, node: str) -> dict[str, str]:
        """Return a stage's environment on ``node``: the job's, and where things are."""
        return {**self.plan.env, "DISPATCH_WORKDIR": workdir, "DISPATCH_COPYBACK": copyback,
                "DISPATCH_NODE": node, "DISPATCH_NODES": " ".join(self.node_names()),
                "DISPATCH_HOSTFILE": str(self.keydir / "hostfile"),
                "DISPATCH_SSH_CONFIG": str(self.keydir / "ssh_config"),
                "DISPATCH_WORKDIRS": str(self.keydir / "workdirs"),
                "OMPI_MCA_plm_rsh_args": f"-F {self.keydir / 'ssh_config'}"}

    def _stages(self) -> int:
        plan = self.plan
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "copyback").mkdir(exist_ok=True)
        (self.workdir / HEAD_COPYBACK).mkdir(exist_ok=True)
        self._chown(self.workdir / "logs", self.workdir / "copyback",
                    self.workdir / HEAD_COPYBACK)
        head = Local(self)
        remotes = [Remote(self, m) for m in self.members]
        nodes: list[Local | Remote] = [head, *remotes]
        try:
            payload = self._payload()
            self._each([functools.partial(r.open, payload) for r in remotes], "payload")
            if plan.bootstrap:
                self._each([functools.partial(n.stage, "bootstrap", plan.bootstrap)
                            for n in nodes], "bootstrap")
            code = self._execute(head)
            if plan.cleanup:
                try:
                    self._each([functools.partial(n.stage, "cleanup", plan.cleanup)
                                for n in nodes], "cleanup")
                except GangFailed as exc:  # the execute stage's own failure comes first
                    raise GangFailed(exc.reason if code == 0 else
                                     f"execute exited {code}; {exc.reason}", code or exc.code
                                     ) from None
            self._each([head.copy_back] + [r.copy_back for r in remotes], "copy-back")
        finally:
            for remote in remotes:
                remote.close()
        return code

    def _payload(self) -> Path:
        path = self.keydir / PAYLOAD
        with tarfile.open(path, "w") as tar:
            for entry in sorted(self.workdir.iterdir()):
                if entry.name not in ("logs", "copyback", HEAD_COPYBACK):
                    tar.add(entry, arcname=entry.name)
        return path

    def _each(self, steps: Sequence[Callable[[], None]], what: str) -> None:
        """Run ``steps`` in parallel while watching the members; raise the first failure."""
        errors: list[BaseException] = []

        def run(step: Callable[[], None]) -> None:
            try:
                step()
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,), name=f"gang-{what}", daemon=True)
                   for s in steps]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                self._pump(0.2)
                if errors:
                    break
        finally:
            if any(t.is_alive() for t in threads):
                Remote.abort_all()
        if errors:
            exc = errors[0]
            raise exc if isinstance(exc, GangFailed) else GangFailed(f"{what}: {exc}")

    def _execute(self, head: Local) -> int:
        plan = self.plan
        out = open_append(self.workdir / plan.stdout, plan)
        err = out if plan.stderr == plan.stdout else open_append(self.workdir / plan.stderr,
                                                                   plan)
        head.note(f"## execute: {shlex.join(plan.argv)}: output in {plan.stdout} and "
                  f"{plan.stderr}\n")
        try:
            proc = subprocess.Popen(plan.argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True,
                                    env=self.env_for(str(self.workdir),
                                                  str(self.workdir / HEAD_COPYBACK), plan.head),
                                    **account(plan))
        except OSError as exc:
            raise GangFailed(f"execute: cannot run {plan.argv[0]!r}: {exc.strerror}",
                             127) from None
        finally:
            os.close(out)
            if err != out:
                os.close(err)
        try:
            while proc.poll() is None:
                self._pump(0.2)
        except GangFailed:
            kill_group(proc, plan.kill_grace_s)
            raise
        head.note(f"## execute exited {proc.returncode}\n")
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode

    def _chown(self, *paths: Path) -> None:
        if self.plan.uid is not None and self.plan.gid is not None:
            for path in paths:
                os.chown(path, self.plan.uid, self.plan.gid)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the driver of the job whose plan is ``argv[0]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.load(Path(args[0]))
    url = os.environ.pop(BROKER_ENV, "")
    driver = Driver(plan, url)
    signal.signal(signal.SIGTERM, lambda *_: driver.stop("stopped by the node"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return driver.run()


if __name__ == "__main__":
    sys.exit(main())
