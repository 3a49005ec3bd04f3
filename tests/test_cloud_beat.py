"""Real ``celery worker`` and ``celery beat`` processes reap servers of the OpenStack double."""

from __future__ import annotations

import kombu
from cloud_fixtures import Processes, heartbeat, offline, old, ours, wait_until
from openstack_double import PASSWORD, OpenStackDouble

from dispatch import events, topology
from dispatch.events import ControlOp
from dispatch.ledger.store import Ledger


def test_a_server_past_its_lifetime_is_deleted_by_beat_within_seconds(
        cloud_double: OpenStackDouble, cloud_procs: Processes, cloud_env: dict[str, str]) -> None:
    cloud_env["DISPATCH_CLOUD_REAP_EVERY"] = "1"
    expired = cloud_double.add_server("dispatch-p-expired",
                                metadata=ours("p", created=old(7200), lifetime_s=3600))
    fresh = cloud_double.add_server("dispatch-p-fresh",
                              metadata=ours("p", created=old(60), lifetime_s=3600))
    foreign = cloud_double.add_server("not-ours", metadata={"lifetime_s": "1"}, created=old(7200))
    cloud_procs.celery_worker()
    cloud_procs.celery_beat()
    wait_until(lambda: expired not in cloud_double.state.servers, "the expired server's deletion",
               describe=cloud_procs.logs)
    assert fresh in cloud_double.state.servers
    assert foreign in cloud_double.state.servers
    assert cloud_double.deleted_servers() == [expired]
    # The task logs what it did after the deletion: wait for the line, do not race it.
    wait_until(lambda: "dispatch-p-expired" in (log := cloud_procs.log("celery-worker"))
               and "lifetime ended" in log, "the reap task's log line",
               describe=cloud_procs.logs)
    assert PASSWORD not in cloud_procs.logs()


def test_an_idle_node_is_drained_then_deleted_once_offline(
        cloud_double: OpenStackDouble, cloud_procs: Processes, cloud_env: dict[str, str],
        cloud_ledger: Ledger, amqp: kombu.Connection) -> None:
    cloud_env.update({"DISPATCH_CLOUD_REAP_EVERY": "1", "DISPATCH_CLOUD_IDLE_TIMEOUT": "1"})
    idle = "dispatch-p-idle"
    busy = "dispatch-p-busy"
    idle_id = cloud_double.add_server(idle, metadata=ours("p", created=old(600), lifetime_s=86400))
    busy_id = cloud_double.add_server(busy, metadata=ours("p", created=old(600), lifetime_s=86400))
    heartbeat(cloud_ledger, idle, "p", last_job_at=events.now())
    heartbeat(cloud_ledger, busy, "p", running=("job-1",))
    channel = amqp.channel()
    channel.exchange_declare(topology.control_exchange(), "topic", durable=True,
                             auto_delete=False)
    queue, _, _ = channel.queue_declare("", exclusive=True)
    channel.queue_bind(queue, topology.control_exchange(), "node.#")

    drains = []

    def drain_seen() -> bool:
        msg = channel.basic_get(queue, no_ack=True)
        if msg is not None:
            drains.append(msg)
        return bool(drains)

    cloud_procs.celery_worker()
    cloud_procs.celery_beat()
    wait_until(drain_seen, "a drain request", describe=cloud_procs.logs)
    msg = drains[0]
    assert msg.delivery_info["routing_key"] == events.control_key(ControlOp.DRAIN, idle)
    assert msg.properties["user_id"] == "guest"  # broker-validated sender
    assert msg.properties["content_type"] == events.CONTENT_TYPE
    body = events.decode(msg.body, what="control")
    assert (body["op"], body["node"], body["by"]) == ("drain", idle, "guest")
    assert body["reason"].startswith("idle for ")
    wait_until(lambda: cloud_double.by_name(idle)["metadata"].get("drain_requested_at"),
               "the drain to be recorded on the server", describe=cloud_procs.logs)
    assert idle_id in cloud_double.state.servers  # still running what it has: not deleted yet
    # The node obeys: it reports draining, then goes offline.
    heartbeat(cloud_ledger, idle, "p", last_job_at=events.now(), draining=True)
    offline(cloud_ledger, idle)
    wait_until(lambda: idle_id not in cloud_double.state.servers, "the drained server's deletion",
               describe=cloud_procs.logs)
    assert busy_id in cloud_double.state.servers
    assert cloud_double.deleted_servers() == [idle_id]
    channel.close()


def test_two_beats_and_two_workers_delete_each_server_once(
        cloud_double: OpenStackDouble, cloud_procs: Processes, cloud_env: dict[str, str]) -> None:
    cloud_env["DISPATCH_CLOUD_REAP_EVERY"] = "1"
    cloud_double.state.delete_delay_s = 0.7  # each run takes seconds: the runs overlap
    expired = [cloud_double.add_server(f"dispatch-p-{i}",
                                 metadata=ours("p", created=old(7200), lifetime_s=60))
               for i in range(3)]
    for name in ("worker-a", "worker-b"):
        cloud_procs.celery_worker(name, concurrency=1)
    cloud_procs.celery_beat("beat-a")
    cloud_procs.celery_beat("beat-b")
    wait_until(lambda: not any(s in cloud_double.state.servers for s in expired),
               "every expired server's deletion", timeout_s=40, describe=cloud_procs.logs)
    wait_until(lambda: "holds the lock; skipped" in cloud_procs.logs(),
               "a reap run that found the lock taken", describe=cloud_procs.logs)
    assert sorted(cloud_double.deleted_servers()) == sorted(expired)
