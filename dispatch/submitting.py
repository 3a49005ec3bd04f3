"""Turning job specs into request messages, and publishing a batch of them with confirms.

A batch is published whole and its confirms are then awaited together: one round
trip for the batch instead of one a job, with the same guarantee (every job is
confirmed by the broker, or the caller hears why not).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dispatch import broker, headers, topology
from dispatch.archive import ZIP_CONTENT_TYPE, zip_paths
from dispatch.errors import UnroutableError
from dispatch.job import JobSpec

__all__ = ["Request", "publish_batch", "request"]

#: Jobs published before their confirms are awaited (bounds what a lost connection
#: leaves in doubt, and the memory of a large array).
WINDOW = 256


@dataclass(frozen=True)
class Request:
    """One job ready to publish: its id, its pool, its message, the exchange it goes to."""

    job_id: str
    pool: str
    message: Any
    exchange: str = topology.jobs_exchange()


def request(spec: JobSpec, *, reply_to: str, user: str,
            queue_type: str = topology.CLASSIC) -> Request:
    """Build the request message of ``spec`` (inputs zipped), replies going to ``reply_to``.

    On quorum queues the job goes to the exchange of its priority level.
    """
    job_id = spec.job_id or uuid.uuid4().hex
    pool = topology.check_pool_name(spec.pool)
    body = zip_paths(list(spec.inputs)) if spec.inputs else b""
    props: dict[str, Any] = {
        "message_id": job_id,
        "correlation_id": job_id,
        "reply_to": reply_to,
        "priority": spec.priority,
        # The broker checks user_id against the connection's user: the job's owner
        # is a fact, not a claim, and only that owner (or an admin) may rm/hold it.
        "user_id": user,
    }
    if body:
        props["content_type"] = ZIP_CONTENT_TYPE
    return Request(job_id, pool, broker.message(body, headers.encode_request(spec), **props),
                   topology.jobs_exchange_for(spec.priority, queue_type))


def publish_batch(confirms: broker.Confirms, returned: set[str],
                  batch: Sequence[Request]) -> None:
    """Publish ``batch`` (mandatory), then wait until the broker confirms every job.

    ``returned`` is where the client's return handler notes the job ids of the
    messages the broker could not route. Raises UnroutableError naming a pool no
    queue serves, or PublishNackedError or BrokerError as
    :meth:`broker.Confirms.wait_for` does.
    """
    returned.clear()
    what = f"pool {batch[0].pool!r}" if len(batch) == 1 else f"{len(batch)} jobs"
    with broker.translated(f"submitting to {what}"):
        seqs = [confirms.publish(r.message, r.exchange, r.pool, mandatory=True) for r in batch]
        for seq in seqs:
            confirms.wait_for(seq)
    lost = sorted({r.pool for r in batch if r.job_id in returned})
    if lost:
        pool = lost[0]
        raise UnroutableError(
            f"no pool {pool!r}: no queue is bound to "
            f"{next(r.exchange for r in batch if r.pool == pool)} "
            f"with key {pool!r} (start a worker with --pool {pool})")
