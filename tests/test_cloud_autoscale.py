"""Autoscaling from real queue depth on the test broker, within quotas; failing images banned."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import kombu
import pytest
from cloud_fixtures import IMAGE
from openstack_double import OpenStackDouble

from dispatch import broker, topology
from dispatch.client import Client
from dispatch.job import JobSpec
from workers.cloud import reaper, scaler
from workers.cloud.flavors import Need
from workers.cloud.servers import Cloud
from workers.cloud.settings import CloudSettings


@pytest.fixture
def cloud(cloud_env: dict[str, str]) -> Iterator[Cloud]:
    settings = CloudSettings.from_env(cloud_env)
    with Cloud.connect(settings.require_clouds_yaml(), settings.cloud) as c:
        yield c


def queue_jobs(amqp: kombu.Connection, client: Client, pool: str, count: int) -> None:
    broker.declare_pool(amqp.default_channel, pool)  # no node yet: the jobs wait in the queue
    for _ in range(count):
        client.submit(JobSpec("true", pool=pool))


def test_waiting_jobs_boot_nodes_up_to_the_node_quota_and_no_more(
        cloud: Cloud, cloud_double: OpenStackDouble, cloud_env: dict[str, str], pool: str,
        amqp: kombu.Connection, client: Client) -> None:
    settings = CloudSettings.from_env({**cloud_env, "DISPATCH_CLOUD_POOLS": f"{pool},idle-pool",
                                       "DISPATCH_CLOUD_MAX_NODES": "3"})
    queue_jobs(amqp, client, pool, 5)
    booted = scaler.autoscale(cloud, settings)
    assert [b["pool"] for b in booted] == [pool]
    assert len(booted[0]["servers"]) == 3  # 5 one-core jobs on m1.tiny, capped at 3 nodes
    assert {s.flavor_id for s in cloud.servers()} == {"1"}
    assert scaler.autoscale(cloud, settings) == []  # booting nodes count; the quota is full
    assert len(cloud_double.calls("POST", r"/servers$")) == 3


def test_jobs_waiting_at_every_priority_level_of_a_quorum_pool_boot_nodes(
        cloud: Cloud, cloud_env: dict[str, str], pool: str, vhost_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_QUEUE_TYPE", topology.QUORUM)
    settings = CloudSettings.from_env({**cloud_env, "DISPATCH_BROKER_URL": vhost_url,
                                       "DISPATCH_CLOUD_POOLS": pool,
                                       "DISPATCH_CLOUD_MAX_NODES": "5"})
    with kombu.Connection(vhost_url, heartbeat=0) as conn, Client(vhost_url) as client:
        broker.declare_pool_queues(conn.default_channel, pool)  # no node: the jobs wait
        for priority in (9, 9, 1):  # two high, one low, none at the normal level
            client.submit(JobSpec("true", pool=pool, priority=priority))
    assert scaler.queue_depth(vhost_url, pool) == 3
    booted = scaler.autoscale(cloud, settings)
    assert [(b["pool"], len(b["servers"])) for b in booted] == [(pool, 3)]


def test_booting_nodes_count_against_the_waiting_jobs() -> None:
    assert scaler.shortfall(5, [], free_slots=0, booting_slots=0, slots_per_node=2) == 3
    assert scaler.shortfall(5, [], free_slots=1, booting_slots=2, slots_per_node=2) == 1
    assert scaler.shortfall(2, [Need(cpus=4), Need(cpus=4)], 0, 0, 4) == 2
    assert scaler.shortfall(0, [], 0, 0, 1) == 0
    assert scaler.largest([Need(2, 100), Need(1, 4000, 10)]) == Need(2, 4000, 10)


def test_an_image_that_keeps_failing_to_boot_is_banned_from_autoscaling(
        cloud: Cloud, cloud_double: OpenStackDouble, cloud_env: dict[str, str], pool: str,
        amqp: kombu.Connection, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    settings = CloudSettings.from_env({**cloud_env, "DISPATCH_CLOUD_POOLS": pool,
                                       "DISPATCH_CLOUD_BAN_AFTER": "2"})
    cloud_double.state.failing_images.add(cloud.image(IMAGE).id)
    queue_jobs(amqp, client, pool, 2)
    assert len(scaler.autoscale(cloud, settings)[0]["servers"]) == 2
    verdicts = reaper.reap(cloud, settings)
    assert [v.reason for v in verdicts] == ["server is in ERROR"] * 2
    assert cloud.servers() == []
    caplog.set_level(logging.WARNING)
    assert scaler.autoscale(cloud, settings) == []
    assert f"image {IMAGE} is banned after repeated boot failures" in caplog.text
    assert len(cloud_double.calls("POST", r"/servers$")) == 2
