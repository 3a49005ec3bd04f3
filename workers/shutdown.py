"""A node's part of ``dispatch shutdown`` (openstack-queue's qterm).

A shutdown order reaches every node (key ``nodes.shutdown``); a node obeys it when it
serves one of the order's pools (or the order names none) and the order was given
after the node started (its control queue outlives it for a day: a node started
later must not stop at an old order). The node stops taking jobs, hands back those
waiting for a slot, and then either finishes its running jobs or, with ``requeue``,
kills them and hands them back too, so another node reruns them: a job the node
still holds unacked is rejected to its queue; a job already acked to the ledger's
keeping goes out again from the ledger, whose lease on it ends when the node says it
went offline. The node says offline and exits once nothing runs.

The sender learns what each node did from an answer on its ``reply_to`` (only a reply
queue of the sender's own broker user, ``dispatch.reply.<user_id>-...``): a refusal,
such as an untrusted sender, is answered too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dispatch import broker, events, topology
from dispatch.errors import InvalidMessageError
from dispatch.job import JobState
from workers.jobflow import JobFlow
from workers.nodebase import Active
from workers.orders import Order

log = logging.getLogger(__name__)

#: How long, past the kill grace, a node waits for a requeued job's processes to go.
REQUEUE_WAIT_S = 5.0


class NodeShutdown(JobFlow):
    """Obeys shutdown orders and answers their senders."""

    def _shut_down(self, message: Any, order: Order) -> None:
        """Stop this node as ``order`` says, if it is for this node and not older than it."""
        mine = {*self.config.pools, *([self.config.queue] if self.config.queue else [])}
        if order.pools and mine.isdisjoint(order.pools):
            return
        if not order.at or order.at < self.started_at:
            log.info("node %s: ignoring a shutdown given at %s, before it started",
                     self.machine.name, order.at or "an unknown time")
            return
        why = f"shut down by {order.by}" + (f": {order.reason}" if order.reason else "")
        log.info("node %s: %s; %s %d running job(s)", self.machine.name, why,
                 "requeueing" if order.requeue else "finishing", len(self.running))
        self.draining = True
        self.request_stop(why)
        self._next_heartbeat = 0.0
        requeued = self._requeue_running(why) if order.requeue else []
        self._answer_order(message, order.op.value, ok=True, running=len(self.running),
                           requeued=requeued)

    def _answer_refusal(self, message: Any, reason: str) -> None:
        """Tell the sender of a refused control message why, if it asked to be told."""
        try:
            op = str(events.decode(broker.raw_body(message), what="control")["op"])
        except InvalidMessageError:
            op = None
        self._answer_order(message, op, ok=False, error=reason)

    def _requeue_running(self, why: str) -> list[str]:
        """Kill every running job and hand it back to be run elsewhere; return their ids."""
        actives = [a for a in self.running.values() if a.job is not None]
        for active in actives:
            if active.job is not None:
                log.info("job %s: killed to be run elsewhere: %s", active.request.job_id, why)
                active.job.kill(removed=True)
        deadline = time.monotonic() + self.config.kill_grace_s + REQUEUE_WAIT_S
        for active in actives:
            self._hand_back(active, why, deadline)
        return [a.request.job_id for a in actives]

    def _hand_back(self, active: Active, why: str, deadline: float) -> None:
        job, job_id = active.job, active.request.job_id
        if job is None:  # pragma: no cover - only jobs with a process are handed back
            return
        while job.poll() is None and time.monotonic() < deadline:
            job.enforce(time.monotonic())  # SIGKILL once the kill grace is over
            time.sleep(0.02)
        if job.has_pidfd:
            self._selector.unregister(job)
        job.close()
        del self.running[job_id]
        self.chirp.forget(job_id)
        self.slots.give(active.request.spec.resources)
        self.runner.cleanup(job)
        if active.delivery_tag is None:
            return  # in the ledger's keeping: it sends the job out again (see above)
        self._reply(active.env, JobState.IDLE, b"", host=self.machine.name,
                    reason=f"{why}; queued again")
        self._channel().basic_reject(active.delivery_tag, requeue=True)
        active.delivery_tag = None

    def _answer_order(self, message: Any, op: str | None, *, ok: bool,
                      error: str | None = None, **fields: Any) -> None:
        """Tell the sender of a control message what this node did, where it asked to be told.

        Answers go only to a reply queue of the sender's own (broker-validated) user, so
        nobody can make nodes write into another user's queue.
        """
        props = message.properties
        reply_to, user = props.get("reply_to"), props.get("user_id")
        try:
            own = topology.reply_queue(f"{user}-") if user else None
        except ValueError:
            own = None
        if not reply_to or own is None or not str(reply_to).startswith(own):
            return
        body = {"op": op, "node": self.machine.name, "ok": ok,
                "error": error, "at": events.now(), **fields}
        msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                             correlation_id=props.get("correlation_id"), delivery_mode=1)
        self._replies.confirms.publish(msg, "", str(reply_to), mandatory=False)
