"""Lease expiry as a Celery beat task: a job whose node stopped heartbeating is sent out again."""

from __future__ import annotations

import datetime
import uuid

import kombu
from cloud_fixtures import Processes, wait_until

from dispatch import broker, events, topology
from dispatch.events import Event
from dispatch.ledger.store import Ledger


def test_beat_sends_out_again_a_job_whose_lease_expired(cloud_procs: Processes,
                                                        cloud_env: dict[str, str],
                                                        cloud_ledger: Ledger,
                                                        amqp: kombu.Connection, pool: str) -> None:
    cloud_env["DISPATCH_LEASE_CHECK_EVERY"] = "1"
    channel = amqp.channel()
    queue = broker.declare_pool(channel, pool)
    job_id = uuid.uuid4().hex
    request = events.capture_request({"message_id": job_id, "correlation_id": job_id},
                                     {"Cmd": "true"}, b"")
    request.update(exchange=topology.jobs_exchange(), routing_key=pool)
    claim = events.job_event(Event.CLAIMED, job_id=job_id, attempt=1, pool=pool, node="gone",
                             host="gone", request=request, lease_s=1.0)
    claim["at"] = (datetime.datetime.now(datetime.UTC)
                   - datetime.timedelta(minutes=1)).isoformat()
    assert cloud_ledger.apply(claim)

    cloud_procs.celery_worker()
    cloud_procs.celery_beat()
    found = []
    wait_until(lambda: (msg := channel.basic_get(queue, no_ack=True)) is not None
               and found.append(msg) is None, "the job sent out again",
               describe=cloud_procs.logs)
    sent = found[0]
    assert sent.properties["message_id"] == job_id
    assert sent.properties["application_headers"]["Attempt"] == 2
    # The ledger commits once the broker confirmed the copy: wait for it, do not race it.
    wait_until(lambda: (r := cloud_ledger.job(job_id)) is not None and r.attempt == 2,
               "the ledger's record of attempt 2", describe=cloud_procs.logs)
    assert "lease expired on gone" in (cloud_ledger.job(job_id).reason or "")
    wait_until(lambda: "expire-leases: sent out again or held 1 job(s)"
               in cloud_procs.log("celery-worker"), "the task's log line",
               describe=cloud_procs.logs)
