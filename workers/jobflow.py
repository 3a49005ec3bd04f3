"""How a job moves through a node: received, admitted, started, claimed, reaped, acked."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import selectors
import time
import uuid
from collections.abc import Iterator
from typing import Any

from dispatch import broker, events, gang, headers, topology
from dispatch.errors import InvalidJobError, UnsatisfiableJobError
from dispatch.events import ControlOp, Event
from dispatch.job import JobState
from workers import intake
from workers.gangmember import GangMembers
from workers.nodebase import RECENT_JOBS, Active
from workers.orders import Order
from workers.replies import Settle
from workers.spool import Packed

log = logging.getLogger(__name__)

#: How long a job runs before its claim goes to the ledger. A job that ends sooner is
#: acked at its final reply's confirm, as without a ledger, and its claim follows that
#: reply: the many short jobs add nothing to their round trip while they run, and every
#: job that runs long enough to need a lease has one.
CLAIM_AFTER_S = 0.05


class JobFlow(GangMembers):
    """Receives job messages and carries each job to its final, confirmed reply."""

    # -- jobs ---------------------------------------------------------------------------

    def _receive(self, message: Any) -> None:
        """Take one job delivery in; whatever it holds, it ends replied to or kept."""
        message.body = broker.raw_body(message)
        env: headers.Envelope | None = None
        try:
            if gang.is_token(message.headers):  # workers/gangmember.py
                self._gang_token(message)
                return
            env = headers.envelope(message.properties, message.headers or {})
            self._take(message, env)
        except Exception as exc:  # a bug must cost one job, never the node
            if self._lost_connection(exc):
                raise
            env = env or _bare_envelope(message)
            log.exception("job %s: unexpected error while admitting it", env.job_id)
            self._reject(message, env, f"internal error on {self.machine.name}: {exc}")

    def _take(self, message: Any, env: headers.Envelope) -> None:
        tag = message.delivery_tag
        if self.stopping:
            self._channel().basic_reject(tag, requeue=True)
            return
        if self._duplicate(env.job_id, tag):
            return
        if env.reply_to is not None and not self._replies.reachable(env.reply_to):
            # Publishing to a missing exchange would close the node's channel.
            self._reject(message, dataclasses.replace(env, reply_to=None),
                         f"reply_to: exchange {env.reply_to.exchange!r} does not exist")
            return
        order = self.orders.stopping_order(env.job_id, env.attempt) if self.orders else None
        if order is not None:
            self._refuse(message, env, order, self._pool_of(message))
        else:
            self._admit(message, env)

    def _pool_of(self, message: Any) -> str:
        info = message.delivery_info
        if info.get("exchange") == topology.jobs_exchange():
            return str(info.get("routing_key") or topology.DEFAULT_POOL)
        return self.config.queue or str(info.get("routing_key") or topology.DEFAULT_POOL)

    def _admit(self, message: Any, env: headers.Envelope) -> None:
        try:
            request = intake.decode(message.properties, message.headers or {}, message.body,
                                    env=env)
            reason = self._unmet(request)
            if reason:
                raise UnsatisfiableJobError(reason)
        except InvalidJobError as exc:
            self._reject(message, env, exc.reason)
            return
        active = Active(message, request, env, message.delivery_tag, self._pool_of(message))
        if self._fits_now(request):
            self._start(active)
        else:
            log.info("job %s: waiting for a free slot", env.job_id)
            self.waiting.append(active)

    def _duplicate(self, job_id: str, tag: int) -> bool:
        """Handle a redelivery of a job this node already runs or has finished."""
        active = self.running.get(job_id) or self.finishing.get(job_id)
        if active is not None:
            # Still running, or its result is on its way (a reconnect brings the job
            # back before the broker confirms the final reply): one run, one result.
            log.info("job %s: redelivered while it %s here; keeping one run", job_id,
                     "runs" if job_id in self.running else "reports")
            if active.claimed:
                self._channel().basic_ack(tag)
            else:
                active.delivery_tag = tag
            return True
        if job_id in self.recent:
            log.info("job %s: redelivered after its result was sent; acking", job_id)
            self._channel().basic_ack(tag)
            return True
        return False

    def _start(self, active: Active) -> None:
        request = active.request
        try:
            workdir = self.runner.prepare(request, active.message.body)
            if request.spec.nodes is not None:  # a multi-node job: this node is its head
                active.job = self._start_driver(request, workdir, active.pool)
            else:
                active.job = self.runner.start(request, workdir,
                                               extra_env=self.chirp.enrol(request.job_id))
        except InvalidJobError as exc:
            self._reject(active.message, active.env, exc.reason)
            return
        except OSError as exc:  # this node's fault (disk full...): let another node try
            log.error("job %s: cannot start here: %s; requeueing", request.job_id, exc)
            self.chirp.forget(request.job_id)
            if active.delivery_tag is not None:
                self._channel().basic_reject(active.delivery_tag, requeue=True)
            return
        self.slots.take(request.spec.resources)
        self.running[request.job_id] = active
        if active.job.has_pidfd:
            self._selector.register(active.job, selectors.EVENT_READ, active)
        if self._claim_mode or request.spec.resources.cpus > 1:
            self._update_prefetch()
        active.running_due = time.monotonic() + self.config.running_after_s
        if self.config.running_after_s <= 0:
            self._send_running(active)
        if active.delivery_tag is not None and self.announcer.claims_wanted:
            # Claimed once it has run CLAIM_AFTER_S (or as it ends); the claim carries
            # started_at and stands for the running event.
            active.claim_due = time.monotonic() + CLAIM_AFTER_S
        else:
            self._event(Event.RUNNING, active, host=self._host(active),
                        started_at=active.job.started_at)

    def _send_running(self, active: Active) -> None:
        """Tell the client its job runs (once; advisory, not confirmed)."""
        active.running_due = None
        if active.job is not None:
            self._reply(active.env, JobState.RUNNING, b"", host=self._host(active),
                        started_at=active.job.started_at)

    def _notices_due(self, now: float) -> None:
        """Send the Running replies and claims of the running jobs that are due.

        A claim whose job's delivery is void (a reconnect; its redelivery not in yet)
        waits another round, and is made for the record at the job's end at the latest.
        """
        for active in list(self.running.values()):
            if active.running_due is not None and active.running_due <= now:
                self._send_running(active)
            if active.claim_due is None or active.claim_due > now or active.job is None:
                continue
            if active.delivery_tag is None:
                active.claim_due = now + CLAIM_AFTER_S
                continue
            active.claim_due = None
            if not self._claim(active, started_at=active.job.started_at):
                self._event(Event.RUNNING, active, host=self._host(active),
                            started_at=active.job.started_at)

    def _claim(self, active: Active, *, started_at: str | None = None,
               ended: bool = False) -> bool:
        """Hand the job to the ledger's keeping: ack it once the claim is confirmed.

        Returns whether a claim went out. With ``started_at`` the claim also says the
        job started then (the ledger and watchers take it as the job's running event).
        A job that ``ended`` is claimed for the ledger's record even if already acked.
        """
        if (active.delivery_tag is None and not ended) or not self.announcer.claims_wanted:
            return False
        message = active.message
        request = events.capture_request(message.properties, message.headers or {},
                                         message.body)
        request["exchange"] = message.delivery_info.get("exchange", "")
        request["routing_key"] = message.delivery_info.get("routing_key", "")

        def claimed(ok: bool) -> None:
            if ok and not active.claimed:
                active.claimed = True
                self._ack(active)

        self.announcer.claim(job_id=active.request.job_id, attempt=active.request.attempt,
                             pool=active.pool, request=request, lease_s=self.config.lease_s,
                             settle=claimed, node=self._host(active), started_at=started_at)
        return True

    def _reap(self, active: Active) -> None:
        job = active.job
        outcome = job.poll() if job is not None else None
        if job is None or outcome is None:
            return
        if job.has_pidfd:
            self._selector.unregister(job)
        request = active.request
        order = active.order
        held = order is not None and order.op is ControlOp.HOLD
        lost_output: str | None = None
        archive: bytes | Packed = b""
        if not held:
            try:
                archive = self.spool.pack(job)
            except (OSError, ValueError) as exc:  # the job left what cannot be read or zipped
                log.error("job %s: its directory cannot be zipped: %s", request.job_id, exc)
                job.close()
                lost_output = f"the working directory could not be zipped: {exc}"
        if held:
            job.close()
        del self.running[request.job_id]
        self.finishing[request.job_id] = active
        self.chirp.forget(request.job_id)
        self.slots.give(request.spec.resources)
        self.jobs_done += 1
        self.last_job_at = events.now()
        state = JobState.HELD if held else JobState.REMOVED if outcome.removed else JobState.EXITED
        log.debug("job %s: %s code=%s signal=%s in %.3fs", request.job_id, state.value,
                  outcome.exit_code, outcome.exit_signal, outcome.duration_s)
        # A job that ended before its Running reply was due gets none: the final
        # reply says when it started.
        active.running_due = None
        result = {"host": self._host(active), "exit_code": outcome.exit_code,
                  "exit_by_signal": outcome.exit_by_signal, "exit_signal": outcome.exit_signal,
                  "duration_s": round(outcome.duration_s, 6)}
        reason = order.describe() if order is not None else lost_output or outcome.reason
        result_bytes = len(archive)
        late_claim = active.claim_due is not None
        active.claim_due = None
        # The final reply before the claim and event: the client waits on it, the
        # ledger does not.
        self._replies.send_result(active.env, state, archive,
                                  settle=lambda ok: self._settled(active, ok),
                                  reason=None if held else reason,
                                  hold_reason=reason if held else None,
                                  started_at=job.started_at, **result)
        if late_claim:
            self._claim(active, started_at=job.started_at, ended=True)
        if state is JobState.EXITED:
            self._event(Event.EXITED, active, result_bytes=result_bytes, reason=reason,
                        **result)
        else:
            self._event(Event.HELD if held else Event.REMOVED, active, reason=reason,
                        by=order.by if order else None, **result)
        self._flush_writes()  # the reply goes now, not after the directory's removal
        self.runner.cleanup(job)
        if not self._claim_mode:
            self._unblock_prefetch()
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self.waiting and not self.stopping:
            if not self._fits_now(self.waiting[0].request):
                return
            self._start(self.waiting.popleft())

    def _hand_back_waiting(self) -> None:
        while self.waiting:
            active = self.waiting.popleft()
            if active.delivery_tag is not None:
                self._channel().basic_reject(active.delivery_tag, requeue=True)

    def _event(self, event: Event, active: Active, **fields: Any) -> None:
        self.announcer.job(event, job_id=active.request.job_id,
                           attempt=active.request.attempt, pool=active.pool,
                           node=self._host(active), **fields)

    def _reply(self, env: headers.Envelope, state: JobState, body: bytes, *,
               settle: Settle | None = None, **fields: Any) -> None:
        if env.reply_to is None:
            if settle is not None:
                settle(True)
            return
        self._replies.send(env, state, body, settle=settle, **fields)

    def _reject(self, message: Any, env: headers.Envelope, reason: str) -> None:
        """Reply Rejected (where there is an address), tell the ledger, dead-letter the message.

        Each step is on its own: one that fails is logged and the others still happen.
        The message is acked only once its dead-letter copy is confirmed, or once it is
        parked on the spool when no copy can be made.
        """
        reason = _short(reason)
        log.warning("job %s: rejected: %s", env.job_id, reason)
        with self._step(env.job_id, "Rejected reply"):
            if env.reply_to is not None and not self._replies.reachable(env.reply_to):
                log.warning("job %s: reply_to %s does not exist; no Rejected reply",
                            env.job_id, env.reply_to)
            else:
                self._reply(env, JobState.REJECTED, b"", reason=reason,
                            host=self.machine.name)
        with self._step(env.job_id, "Rejected event"):
            request = events.capture_request(message.properties, message.headers or {}, b"")
            self.announcer.job(Event.REJECTED, job_id=env.job_id, attempt=env.attempt,
                               pool=self._pool_of(message), host=self.machine.name,
                               reason=reason, request=request)
        self._dead_letter(message, env.job_id, reason)

    def _dead_letter(self, message: Any, job_id: str, reason: str) -> None:
        tag = message.delivery_tag

        def settled(ok: bool) -> None:
            if ok:
                self._ack_if(True, tag, job_id)
            else:
                self._park(message, job_id, reason, "the dead-letter copy was refused")

        try:
            self._replies.dead_letter(message, reason, settle=settled)
        except Exception as exc:
            if self._lost_connection(exc):
                raise
            log.exception("job %s: dead-letter copy failed", job_id)
            self._park(message, job_id, reason, f"the dead-letter copy failed: {exc}")

    def _park(self, message: Any, job_id: str, reason: str, why: str) -> None:
        """Keep a message on the spool when it cannot be dead-lettered; ack once it is kept."""
        tag = message.delivery_tag
        try:
            path = self.spool.park(job_id, message, reason)
        except (OSError, ValueError, TypeError) as exc:
            log.error("job %s: %s and the spool failed (%s); requeueing it", job_id, why, exc)
            if tag is not None:
                self._channel().basic_reject(tag, requeue=True)
            return
        log.error("job %s: %s; message kept in %s", job_id, why, path)
        self._ack_if(True, tag, job_id)

    @contextlib.contextmanager
    def _step(self, job_id: str, what: str) -> Iterator[None]:
        """Run one step of handling a bad message; a failure is logged, not raised."""
        try:
            yield
        except Exception as exc:
            if self._lost_connection(exc):
                raise
            log.exception("job %s: %s failed", job_id, what)

    def _refuse(self, message: Any, env: headers.Envelope, order: Order, pool: str) -> None:
        """Drop a job that was removed or held before it could run here."""
        held = order.op is ControlOp.HOLD
        reason = order.describe()
        log.info("job %s: not run: %s", env.job_id, reason)
        state = JobState.HELD if held else JobState.REMOVED
        tag = message.delivery_tag

        def kept(ok: bool) -> None:
            if ok or not held:
                self._ack_if(True, tag, env.job_id)
            else:  # nobody keeps held jobs (no ledger): park it, never lose it
                self._replies.dead_letter(message, f"{reason} (no ledger keeps held jobs)",
                                          settle=lambda ok: self._ack_if(ok, tag, env.job_id))

        done = _AllSettled(2, kept)
        self._reply(env, state, b"", settle=done, host=self.machine.name,
                    reason=None if held else reason, hold_reason=reason if held else None)
        fields: dict[str, Any] = {"host": self.machine.name, "reason": reason, "by": order.by}
        if held:
            fields["request"] = events.capture_request(message.properties,
                                                       message.headers or {}, message.body)
        self.announcer.job(Event.HELD if held else Event.REMOVED, job_id=env.job_id,
                           attempt=env.attempt, pool=pool, settle=done, must_land=held,
                           **fields)

    def _settled(self, active: Active, ok: bool) -> None:
        job_id = active.request.job_id
        self.finishing.pop(job_id, None)
        self.recent[job_id] = None
        if len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)
        if active.claimed:
            return
        if not self._claim_mode:
            # The prefetch this job held goes down *before* its ack: the other way round
            # the broker would fill the freed place with a job no slot is free for.
            self._update_prefetch()
        if ok:
            self._ack(active)
        else:
            self._ack_if(False, active.delivery_tag, job_id)
            active.delivery_tag = None

    def _ack(self, active: Active) -> None:
        """Ack a job message once, whichever of its claim or final reply settles first."""
        if active.delivery_tag is not None:
            tag, active.delivery_tag = active.delivery_tag, None
            if self._claim_mode:
                # The prefetch this job held goes down before its ack (see _settled).
                self._update_prefetch()
            self._channel().basic_ack(tag)

    def _ack_if(self, ok: bool, tag: int | None, job_id: str) -> None:
        if tag is None:
            return
        if ok:
            self._channel().basic_ack(tag)
        else:
            log.error("job %s: broker refused the final reply; requeueing the job", job_id)
            self._channel().basic_reject(tag, requeue=True)


#: Longest reason a Rejected reply carries (a reply's headers must fit one frame).
MAX_REASON_CHARS = 1000


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


def _bare_envelope(message: Any) -> headers.Envelope:
    """Return an envelope with no reply address, for a message nothing else could be read of."""
    job_id = message.properties.get("message_id")
    return headers.Envelope(job_id=str(job_id or uuid.uuid4()), reply_to=None,
                            correlation_id=str(job_id or ""), owner=None, classad_quoted=False)


class _AllSettled:
    """Calls ``done(ok)`` once ``count`` publishes have settled, ``ok`` if all went well."""

    def __init__(self, count: int, done: Settle) -> None:
        self.left = count
        self.ok = True
        self.done = done

    def __call__(self, ok: bool) -> None:
        self.ok = self.ok and ok
        self.left -= 1
        if self.left == 0:
            self.done(self.ok)
