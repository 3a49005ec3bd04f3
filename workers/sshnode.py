"""A node of SSH hosts: one ``dispatch worker --ssh-hosts`` process serving many machines.

It is an :class:`~workers.node.ExecuteNode` whose jobs run on the hosts of a hosts
file (:mod:`workers.sshhosts`) instead of here: placement picks the host
(:mod:`workers.hostpool`), each job is a channel on that host's one connection
(:mod:`workers.remote`, :mod:`workers.sshlink`). Each host speaks as a node of its own
on the events exchange, named after it: its heartbeats carry its attributes and slots
(``dispatch stat`` draws its bars, ``dispatch explain`` matches Requirements against
it), and jobs are claimed, run and reported under its name. A host that stops
answering is announced offline with a reason starting ``down:``; its running jobs go
back to the queue (or, once claimed, to the ledger, which sends them out again as the
host's offline event ends their lease). It is retried with backoff and heartbeats again
once it answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace

from dispatch import events
from dispatch.job import JobRequest
from workers.hostpool import HostPool
from workers.node import ExecuteNode
from workers.nodebase import Active, NodeConfig
from workers.remote import RemoteJob, RemoteRunner, RemoteSpool
from workers.runner import RunAs, Runner
from workers.sshhosts import HostsFile
from workers.sshlink import HostLink

log = logging.getLogger(__name__)

__all__ = ["SshHostsNode", "node_config"]


def node_config(config: NodeConfig, hosts: HostsFile) -> NodeConfig:
    """Return ``config`` with the slots and memory of all ``hosts`` together."""
    return replace(config, slots=sum(h.cores for h in hosts.hosts),
                   memory_mb=sum(h.memory_mb for h in hosts.hosts), user=None)


class SshHostsNode(ExecuteNode):
    """Runs each job on one of the SSH hosts of a hosts file."""

    def __init__(self, config: NodeConfig, hosts: HostsFile) -> None:
        pools = (*config.pools, *([config.queue] if config.queue else []))
        self.pool = HostPool([HostLink(h, pools, wake=self._wake_up,
                                       reconnect_max_s=hosts.reconnect_max_s)
                              for h in hosts.hosts])
        super().__init__(node_config(config, hosts))
        self.spool = RemoteSpool(self.spool.root, self.spool.max_result_bytes)

    def _wake_up(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # -- the hooks of NodeBase ----------------------------------------------------------

    def _make_runner(self, run_as: RunAs | None) -> Runner:
        cfg = self.config
        return RemoteRunner(self.pool, cfg.spool_dir or cfg.workdir_root / ".spool",
                            cfg.max_result_bytes, cfg.kill_grace_s)

    def _unmet(self, request: JobRequest) -> str | None:
        return self.pool.unmet(request)

    def _fits_now(self, request: JobRequest) -> bool:
        return self.pool.pick(request) is not None

    def _host(self, active: Active) -> str:
        job = active.job
        return job.link.name if isinstance(job, RemoteJob) else self.machine.name

    # -- hosts going down and coming back -----------------------------------------------

    def _enforce_limits(self) -> None:
        super()._enforce_limits()
        now = time.monotonic()
        for link in self.pool.links:
            change = link.check(now)
            if change == "down":
                self._host_down(link)
            elif change == "up":
                self._next_heartbeat = 0.0  # say so now; then jobs may land there
                self._start_waiting()

    def _host_down(self, link: HostLink) -> None:
        for active in list(self.running.values()):
            job = active.job
            if isinstance(job, RemoteJob) and job.link is link:
                job.lost = job.lost or f"lost with host {link.name}: {link.down_reason}"
                self._fail_over(active, job)
        if self._replies_now is not None:
            self.announcer.offline(f"{events.HOST_DOWN_PREFIX}{link.down_reason}",
                                   node=link.name)

    def _reap(self, active: Active) -> None:
        job = active.job
        if isinstance(job, RemoteJob):
            outcome = job.poll()
            if outcome is None:
                return
            if job.lost is not None:
                self._fail_over(active, job)
                if job.link.lost(job.lost) == "down":
                    self._host_down(job.link)
                return
            job.link.confirmed()
            job.link.jobs_done += 1
            job.link.last_job_at = events.now()
        super()._reap(active)

    def _fail_over(self, active: Active, job: RemoteJob) -> None:
        """Give up a job lost with its host: it runs again, elsewhere."""
        request = active.request
        if self.running.pop(request.job_id, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(job)
        self.chirp.forget(request.job_id)
        self.slots.give(request.spec.resources)
        self.runner.cleanup(job)
        if active.claimed:
            log.warning("job %s: %s; the ledger sends it out again", request.job_id, job.lost)
        else:
            log.warning("job %s: %s; requeued", request.job_id, job.lost)
            if active.delivery_tag is not None and self._conn is not None:
                self._channel().basic_reject(active.delivery_tag, requeue=True)
            active.delivery_tag = None
        if not self._claim_mode and self._conn is not None:
            self._update_prefetch()

    # -- each host is a node on the events exchange ---------------------------------------

    def _heartbeat(self) -> None:
        cfg = self.config
        self._next_heartbeat = time.monotonic() + cfg.heartbeat_interval_s
        self.announcer.look_for_ledger(self._connection())
        pools = list(cfg.pools) + ([cfg.queue] if cfg.queue else [])
        for link in self.pool.links:
            if not link.up:
                continue
            running = [{"job_id": a.request.job_id, "attempt": a.request.attempt,
                        "started_at": a.job.started_at}
                       for a in self.running.values()
                       if isinstance(a.job, RemoteJob) and a.job.link is link]
            self.announcer.heartbeat(
                node=link.name, pools=pools, machine=link.attrs,
                slots_total=link.machine.cpus, slots_free=link.slots.free_cpus,
                memory_free_mb=link.machine.memory_mb - link.slots.memory_used_mb,
                running=running, waiting=0, draining=self.draining,
                jobs_done=link.jobs_done, last_job_at=link.last_job_at,
                started_at=self.started_at, interval_s=cfg.heartbeat_interval_s,
                lease_s=cfg.lease_s)

    def _finished(self, cancelled: bool) -> bool:
        sent = self._offline_sent
        finished = super()._finished(cancelled)
        if self._offline_sent and not sent:
            for link in self.pool.links:
                self.announcer.offline(self.stop_reason, node=link.name)
        return finished

    def _serve(self) -> None:
        log.info("node %s: jobs run on SSH hosts %s", self.machine.name,
                 ", ".join(f"{link.name} ({link.machine.cpus} cores)"
                           for link in self.pool.links))
        super()._serve()

