"""Servers for multi-node jobs: real RabbitMQ events, openstacksdk over HTTP to the double."""

from __future__ import annotations

import contextlib
import datetime
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
from cloud_fixtures import Processes, old, ours, wait_until
from openstack_double import OpenStackDouble

from dispatch import broker, events, gang, topology
from dispatch.errors import InvalidMessageError
from dispatch.events import Event
from workers.cloud import metadata, reaper
from workers.cloud.reaping import Action, ReapPolicy, judge
from workers.cloud.servers import Cloud, Server
from workers.cloud.settings import CloudSettings
from workers.cloud.watcher import GangWatcher

HEAD = "node-head-1"


@pytest.fixture
def settings(cloud_env: dict[str, str], pool: str) -> CloudSettings:
    return CloudSettings.from_env({**cloud_env, "DISPATCH_CLOUD_POOLS": pool})


Start = Callable[..., GangWatcher]


@pytest.fixture
def start_watcher(settings: CloudSettings) -> Iterator[Start]:
    """Start a gang watcher in a thread (settings overridable); stop it after the test."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(**changes: Any) -> GangWatcher:
        import dataclasses  # noqa: PLC0415

        watcher = GangWatcher(dataclasses.replace(settings, **changes))
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        assert watcher.ready.wait(30), "the gang watcher did not start"
        return watcher

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(30)


def publish(amqp: kombu.Connection, body: dict[str, Any]) -> None:
    """Publish an event as a node does: msgpack, persistent, confirmed."""
    channel = amqp.channel()
    try:
        channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                                 auto_delete=False)
        confirms = broker.Confirms(channel)
        seq = confirms.publish(broker.message(events.encode(body), {},
                                              content_type=events.CONTENT_TYPE),
                               topology.events_exchange(),
                               events.routing_key(Event(body["event"]), body["pool"]),
                               mandatory=False)
        confirms.wait_for(seq)
    finally:
        channel.close()


def gathering(job: str, pool: str, *, held: int, low: int, high: int, started: bool = False,
              cpus: int = 2, memory_mb: int = 3000) -> dict[str, Any]:
    return events.job_event(Event.GATHERING, job_id=job, attempt=1, pool=pool, node=HEAD,
                            held=held, min=low, max=high, cpus=cpus, memory_mb=memory_mb,
                            disk_mb=0, requirements="", started=started,
                            status=f"holds {held} of {low}-{high} nodes")


def ended(event: Event, job: str, pool: str) -> dict[str, Any]:
    if event is Event.EXITED:
        return events.job_event(event, job_id=job, attempt=1, pool=pool, node=HEAD, host=HEAD,
                                exit_code=0, exit_by_signal=False, duration_s=1.0)
    return events.job_event(event, job_id=job, attempt=1, pool=pool, node=HEAD,
                            reason="removed by alice", by="alice")


def tokens(amqp: kombu.Connection, job: str, pool: str, count: int) -> None:
    """Queue ``count`` node tokens of ``job`` in the pool, as its head does."""
    channel = amqp.channel()
    try:
        broker.declare_pool(channel, pool)
        for k in range(1, count + 1):
            channel.basic_publish(broker.message(b"", {
                gang.GANG_OF: job, gang.GANG_INBOX: gang.inbox_queue(job),
                gang.GANG_HEAD: HEAD, "RequestCpus": 2},
                message_id=gang.token_id(job, k), content_type="application/octet-stream",
                priority=9), exchange=topology.jobs_exchange(), routing_key=pool)
    finally:
        channel.close()


def take_token(amqp: kombu.Connection, pool: str) -> Any:
    """Take one token and keep it unacked, as an idle node that joins does; return the
    channel holding it (closing the channel would hand it back)."""
    channel = amqp.channel()
    msg = channel.basic_get(topology.pool_queue(pool), no_ack=False)
    assert msg is not None and gang.is_token(msg.headers)
    return channel


def job_id() -> str:
    return f"mpi-{uuid.uuid4().hex[:8]}"


def handled(watcher: GangWatcher, count: int, double: OpenStackDouble) -> None:
    wait_until(lambda: watcher.handled >= count, f"the watcher to handle {count} events",
               timeout_s=60, describe=lambda: f"handled {watcher.handled}; "
               f"servers {double.server_names()}")


def gang_servers(double: OpenStackDouble, job: str) -> list[dict[str, Any]]:
    with double.lock:
        return [s for s in double.state.servers.values()
                if s["metadata"].get(metadata.GANG) == job]


def test_a_gathering_job_short_of_nodes_gets_the_shortfall_in_its_own_server_group_once(
        start_watcher: Start, cloud_double: OpenStackDouble, amqp: kombu.Connection,
        pool: str) -> None:
    job = job_id()
    tokens(amqp, job, pool, 2)
    holder = take_token(amqp, pool)  # the pool's one idle node joined: the head holds 2
    watcher = start_watcher()
    publish(amqp, gathering(job, pool, held=2, low=2, high=3))
    handled(watcher, 1, cloud_double)
    [server] = gang_servers(cloud_double, job)
    assert server["flavor"]["id"] == "3"  # m1.medium: the smallest with 2 cores and 3000 MiB
    assert server["name"].startswith(f"dispatch-{pool}-")
    assert server["metadata"][metadata.POOL] == pool
    assert server["metadata"][metadata.GANG_HEAD] == HEAD
    group = cloud_double.group_named(f"dispatch-{job}")
    assert group is not None
    assert group["policies"] == ["soft-anti-affinity"]
    assert group["members"] == [server["id"]]
    assert cloud_double.state.hints[server["id"]] == {"group": group["id"]}

    for _ in range(3):  # the head repeats itself every 30 s while the server boots
        publish(amqp, gathering(job, pool, held=2, low=2, high=3))
    handled(watcher, 4, cloud_double)
    assert len(gang_servers(cloud_double, job)) == 1
    assert len(cloud_double.calls("POST", r"/servers$")) == 1

    publish(amqp, ended(Event.EXITED, job, pool))
    wait_until(lambda: not gang_servers(cloud_double, job)
               and cloud_double.group_named(f"dispatch-{job}") is None,
               "the job's servers and group to be deleted", timeout_s=60)
    holder.close()


@pytest.mark.parametrize("end", [Event.REMOVED, Event.REJECTED])
def test_a_removed_or_rejected_job_loses_its_servers_and_group(
        end: Event, start_watcher: Start, cloud_double: OpenStackDouble,
        amqp: kombu.Connection, pool: str) -> None:
    job, other = job_id(), job_id()
    tokens(amqp, job, pool, 2)  # no idle node at all: the head holds only itself
    watcher = start_watcher()
    publish(amqp, gathering(job, pool, held=1, low=2, high=3))
    handled(watcher, 1, cloud_double)
    assert len(gang_servers(cloud_double, job)) == 2
    cloud_double.add_server("dispatch-other", metadata={
        **ours(pool, created=old(5), lifetime_s=3600),
        **metadata.gang(job_id=other, head=HEAD, now=old(5))})
    publish(amqp, ended(end, job, pool))
    handled(watcher, 2, cloud_double)
    assert gang_servers(cloud_double, job) == []
    assert cloud_double.group_named(f"dispatch-{job}") is None
    assert cloud_double.server_names() == {"dispatch-other"}  # another job's server stays


def test_a_started_job_gets_no_more_servers_and_its_servers_are_marked_started(
        start_watcher: Start, cloud_double: OpenStackDouble, amqp: kombu.Connection,
        pool: str) -> None:
    job, late = job_id(), job_id()
    tokens(amqp, job, pool, 1)
    watcher = start_watcher()
    publish(amqp, gathering(job, pool, held=1, low=2, high=2))
    handled(watcher, 1, cloud_double)
    [server] = gang_servers(cloud_double, job)
    publish(amqp, gathering(job, pool, held=2, low=2, high=2, started=True))
    handled(watcher, 2, cloud_double)
    assert gang_servers(cloud_double, job)[0]["metadata"].get(metadata.GANG_STARTED_AT)

    tokens(amqp, late, pool, 3)  # started with 2 of 2-5: three tokens still unclaimed
    publish(amqp, gathering(late, pool, held=2, low=2, high=5, started=True))
    publish(amqp, gathering(late, pool, held=2, low=2, high=5))  # a late, stale one
    handled(watcher, 4, cloud_double)
    assert gang_servers(cloud_double, late) == []
    assert cloud_double.group_named(f"dispatch-{late}") is None
    assert [s["id"] for s in gang_servers(cloud_double, job)] == [server["id"]]


def test_a_gathering_job_whose_head_falls_silent_loses_its_servers(
        start_watcher: Start, cloud_double: OpenStackDouble, amqp: kombu.Connection,
        pool: str) -> None:
    job = job_id()
    tokens(amqp, job, pool, 1)
    watcher = start_watcher(gang_silence_s=3)
    publish(amqp, gathering(job, pool, held=1, low=2, high=2))
    handled(watcher, 1, cloud_double)
    assert len(gang_servers(cloud_double, job)) == 1
    wait_until(lambda: not gang_servers(cloud_double, job)
               and cloud_double.group_named(f"dispatch-{job}") is None,
               "the silent job's servers and group to be deleted", timeout_s=60)


def test_quotas_that_cannot_reach_the_minimum_boot_nothing(
        start_watcher: Start, cloud_double: OpenStackDouble, amqp: kombu.Connection,
        pool: str) -> None:
    job = job_id()
    tokens(amqp, job, pool, 3)
    watcher = start_watcher(max_nodes=2)
    publish(amqp, gathering(job, pool, held=1, low=4, high=4))
    handled(watcher, 1, cloud_double)
    assert gang_servers(cloud_double, job) == []


def test_an_unreadable_gathering_event_is_dead_lettered_and_the_next_one_handled(
        start_watcher: Start, cloud_double: OpenStackDouble, amqp: kombu.Connection,
        pool: str) -> None:
    job = job_id()
    tokens(amqp, job, pool, 1)
    watcher = start_watcher()
    bad = gathering(job, pool, held=1, low=2, high=2)
    bad["held"] = "two"
    publish(amqp, bad)
    publish(amqp, gathering(job, pool, held=1, low=2, high=2))
    handled(watcher, 2, cloud_double)
    assert len(gang_servers(cloud_double, job)) == 1
    channel = amqp.channel()  # look at the dead letters without taking them
    dead = []
    while (msg := channel.basic_get(topology.dead_letter_queue(), no_ack=False)) is not None:
        # the queue is shared with every other test's dead letters (some not msgpack at all)
        body = msg.body if isinstance(msg.body, bytes) else str(msg.body).encode(
            "utf-8", "surrogateescape")
        with contextlib.suppress(InvalidMessageError):
            dead.append(events.decode(body))
    channel.close()
    assert [d["held"] for d in dead if d.get("job_id") == job] == ["two"]


def test_the_reaper_finds_a_silent_gang_by_its_metadata_and_drops_its_group(
        cloud_env: dict[str, str], cloud_double: OpenStackDouble, pool: str) -> None:
    settings = CloudSettings.from_env({**cloud_env, "DISPATCH_CLOUD_GANG_SILENCE": "10m"})
    job, live = job_id(), job_id()
    with Cloud.connect(settings.require_clouds_yaml(), settings.cloud) as cloud:
        group_id = cloud.server_group(f"dispatch-{job}", "soft-anti-affinity")
        for name, gang_job, seen in (("silent", job, old(700)), ("live", live, old(20))):
            cloud_double.add_server(name, metadata={
                **ours(pool, created=old(800), lifetime_s=86400),
                **metadata.gang(job_id=gang_job, head=HEAD, now=seen)})
        assert cloud_double.state.groups[group_id]["members"] == []
        verdicts = reaper.reap(cloud, settings)
    assert [(v.server.name, v.action) for v in verdicts] == [("silent", Action.DELETE)]
    assert verdicts[0].reason.startswith(f"job {job}: no word from its head {HEAD} for 11m")
    assert cloud_double.server_names() == {"live"}
    assert cloud_double.group_named(f"dispatch-{job}") is None


NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)


def ago(seconds: float) -> datetime.datetime:
    return NOW - datetime.timedelta(seconds=seconds)


class _Node:
    def __init__(self, name: str, online: bool) -> None:
        self.name, self.online, self.draining = name, online, False
        self.running: tuple[str, ...] = ()
        self.last_heartbeat_at = self.last_job_at = self.started_at = ago(7200)


def test_gang_servers_are_never_drained_as_idle_and_go_when_their_head_goes_offline() -> None:
    def server(name: str, **extra: str) -> Server:
        return Server(id=name, name=name, status="ACTIVE", flavor_id="1", image_id="i",
                      created_at=ago(7200), metadata={
                          **ours("p", created=ago(7200), lifetime_s=86400), **extra})

    member = server("member", **metadata.gang(job_id="j1", head="h1", now=ago(90)),
                    gang_started_at=metadata.stamp(ago(90)))
    waiting = server("waiting", **metadata.gang(job_id="j2", head="h2", now=ago(90)))
    plain = server("plain")
    nodes = {n: _Node(n, True) for n in ("member", "waiting", "plain", "h1")}
    nodes["h2"] = _Node("h2", False)
    verdicts = judge([member, waiting, plain], nodes, NOW, ReapPolicy(idle_timeout_s=600))
    assert [(v.server.name, v.action, v.reason) for v in verdicts] == [
        ("waiting", Action.DELETE, "job j2: its head h2 is offline and silent for 1m30s"),
        ("plain", Action.DRAIN, "idle for 2h00m")]


def test_a_celery_worker_of_the_cloud_plane_runs_the_gang_watcher(
        cloud_procs: Processes, cloud_env: dict[str, str], cloud_double: OpenStackDouble,
        amqp: kombu.Connection, pool: str) -> None:
    job = job_id()
    tokens(amqp, job, pool, 1)
    publish_first = gathering(job, pool, held=1, low=2, high=2)
    cloud_env["DISPATCH_CLOUD_POOLS"] = pool
    cloud_procs.celery_worker()
    wait_until(lambda: "gang watcher: reading" in cloud_procs.log("celery-worker"),
               "the worker's gang watcher", timeout_s=60, describe=cloud_procs.logs)
    publish(amqp, publish_first)
    wait_until(lambda: len(gang_servers(cloud_double, job)) == 1, "a server for the job",
               timeout_s=60, describe=cloud_procs.logs)
    publish(amqp, ended(Event.EXITED, job, pool))
    wait_until(lambda: not gang_servers(cloud_double, job)
               and cloud_double.group_named(f"dispatch-{job}") is None,
               "the job's server and group to be deleted", timeout_s=60,
               describe=cloud_procs.logs)
    assert "double-pass" not in cloud_procs.logs()
