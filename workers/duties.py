"""A node's duties besides running jobs: obeying orders, relaying chirps, heartbeats."""

from __future__ import annotations

import logging
import time
from typing import Any

from dispatch import broker
from dispatch.errors import InvalidJobError
from dispatch.events import ControlOp, Event
from dispatch.job import JobState
from workers.orders import Order
from workers.shutdown import NodeShutdown

log = logging.getLogger(__name__)


class NodeDuties(NodeShutdown):
    """Control orders (remove, hold, drain, shutdown), chirped attributes, heartbeats."""

    # -- control, chirp, heartbeats -------------------------------------------------------

    def _on_control(self, message: Any) -> None:
        """Obey one control message; one that cannot be obeyed is dead-lettered, never fatal."""
        try:
            self._obey(message)
        except Exception as exc:
            if self._lost_connection(exc):
                raise
            log.exception("control message: unexpected error while obeying it")
            self._refuse_order(message, f"internal error on {self.machine.name}: {exc}")

    def _obey(self, message: Any) -> None:
        orders = self.orders
        if orders is None:
            return
        try:
            order = orders.parse(message.properties, broker.raw_body(message))
        except InvalidJobError as exc:
            self._answer_refusal(message, exc.reason)  # if it asked (dispatch shutdown)
            self._refuse_order(message, exc.reason)
            return
        orders.remember(order)
        log.info("node %s: %s %s by %s", self.machine.name, order.op.value,
                 " ".join(order.job_ids) or "node", order.by)
        if order.op is ControlOp.SYNC:  # a ledger (re)started: it wants every job's events
            self.announcer.listening = True
            self._next_heartbeat = 0.0
        elif order.op is ControlOp.DRAIN:
            self.draining = True
            self.request_stop(f"drained by {order.by}")
            self._next_heartbeat = 0.0
        elif order.op is ControlOp.SHUTDOWN:
            self._shut_down(message, order)
        elif order.op is ControlOp.GANG_RELEASE:
            for job_id in order.job_ids:
                self._gang_release(job_id, order.reason or f"released by {order.by}")
        elif order.op in (ControlOp.REMOVE, ControlOp.HOLD):
            for job_id in order.job_ids:
                self._stop_job(job_id, order)
        message.ack()

    def _refuse_order(self, message: Any, reason: str) -> None:
        """Dead-letter a control message that is not an order; park it if that fails."""
        log.warning("control message refused: %s", reason)
        job_id = str(message.properties.get("message_id") or "control")

        def settled(ok: bool) -> None:
            if ok:
                message.ack()
            else:
                self._park_order(message, job_id, reason)

        try:
            self._replies.dead_letter(message, reason, settle=settled)
        except Exception as exc:
            if self._lost_connection(exc):
                raise
            self._park_order(message, job_id, reason)

    def _park_order(self, message: Any, job_id: str, reason: str) -> None:
        try:
            path = self.spool.park(job_id, message, reason)
        except (OSError, ValueError, TypeError) as exc:
            log.error("control message: cannot be dead-lettered or kept (%s); requeueing", exc)
            message.requeue()
            return
        log.error("control message: cannot be dead-lettered; kept in %s", path)
        message.ack()

    def _stop_job(self, job_id: str, order: Order) -> None:
        active = self.running.get(job_id)
        if active is not None and active.job is not None:
            if order.applies_to(job_id, active.request.attempt) and active.order is None:
                log.info("job %s: %s", job_id, order.describe())
                active.order = order
                active.job.kill(removed=True)
            return
        for waiting in list(self.waiting):
            if waiting.request.job_id == job_id:
                self.waiting.remove(waiting)
                self._refuse(waiting.message, waiting.env, order, waiting.pool)

    def _chirped(self) -> None:
        for job_id, name, value in self.chirp.receive():
            active = self.running.get(job_id)
            if active is None:
                continue
            log.info("job %s: attribute %s set", job_id, name)
            self._event(Event.ATTRIBUTE, active, name=name, value=value)
            self._reply(active.env, JobState.RUNNING, b"", host=self.machine.name,
                        attribute=(name, value))

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_interval_s
        self.announcer.look_for_ledger(self._connection())
        running = [{"job_id": a.request.job_id, "attempt": a.request.attempt,
                    "started_at": a.job.started_at if a.job else None}
                   for a in self.running.values()]
        self.announcer.heartbeat(
            pools=list(self.config.pools) + ([self.config.queue] if self.config.queue else []),
            machine=self.attrs, slots_total=self.machine.cpus, slots_free=self.slots.free_cpus,
            memory_free_mb=self.machine.memory_mb - self.slots.memory_used_mb,
            running=running, waiting=len(self.waiting), draining=self.draining,
            jobs_done=self.jobs_done, last_job_at=self.last_job_at, started_at=self.started_at,
            interval_s=self.config.heartbeat_interval_s, lease_s=self.config.lease_s)

    def _follow_claim_mode(self) -> None:
        """Prefetch one job at a time while claims ack jobs early, slots' worth otherwise."""
        mode = self.announcer.listening is True
        if mode != self._claim_mode:
            self._claim_mode = mode
            self._update_prefetch()
