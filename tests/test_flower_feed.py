"""Flower, as a real process, shows Dispatch jobs and execute nodes fed by ``dispatch flower-feed``.

Every part is real: a private vhost on the test broker, ``dispatch ledger``, Flower,
the feed and ``dispatch worker`` as subprocesses; Flower is read through its HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu
import pytest
from cloud_fixtures import Processes, wait_until
from fixtures_ledger import LedgerProcess, user_url
from sshd import free_port

from dispatch import broker, topology
from dispatch.client import Client
from dispatch.job import JobSpec, JobState

from amqp_helpers import wait_for_consumer
from conftest import ROOT, Workers


class Stack:
    """Ledger, feed, Flower and workers on one vhost, and Flower's HTTP API."""

    def __init__(self, url: str, ledger: LedgerProcess, procs: Processes, workers: Workers,
                 pool: str) -> None:
        self.url, self.ledger, self.procs, self.workers, self.pool = (url, ledger, procs,
                                                                      workers, pool)
        self.port = free_port()

    def start_flower(self) -> None:
        self.procs.start("flower", "celery", "--broker", self.url, "flower",
                         f"--port={self.port}", "--address=127.0.0.1",
                         env={**self.procs.env, "FLOWER_UNAUTHENTICATED_API": "true"})
        wait_until(lambda: self.text("/healthcheck") == "OK", "Flower to answer",
                   describe=self.logs)

    def start_feed(self, url: str | None = None) -> subprocess.Popen[bytes]:
        self.feed = self.procs.start("feed", "dispatch", "flower-feed", "--broker",
                                     url or self.url)
        return self.feed

    def start_worker(self, node: str) -> None:
        self.workers.start("--name", node, "--heartbeat-interval", "1", pools=(self.pool,))

    def text(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=10) as reply:
                return str(reply.read().decode())
        except (OSError, urllib.error.HTTPError):
            return None

    def api(self, path: str) -> Any:
        text = self.text(path)
        return json.loads(text) if text else {}

    def tasks(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = self.api("/api/tasks")
        return found

    def task_in(self, job_id: str, *states: str) -> dict[str, Any] | None:
        task = self.tasks().get(job_id)
        return task if task and task.get("state") in states else None

    def logs(self) -> str:
        return (f"{self.procs.logs()}\n--- ledger\n{self.ledger.log()}\n--- worker\n"
                f"{self.workers.log()}\n--- Flower's tasks\n{self.text('/api/tasks')}")


@pytest.fixture
def stack(vhost_url: str, ledger_service: LedgerProcess, workdir_root: Path,
          tmp_path: Path, pool: str) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CELERY"))}
    procs = Processes(env, tmp_path)
    workers = Workers(vhost_url, workdir_root, tmp_path)
    yield Stack(vhost_url, ledger_service, procs, workers, pool)
    workers.stop_all()
    procs.stop_all()


def wait_consumed(url: str, queue: str, stack: Stack) -> None:
    def gone() -> str | None:
        feed = getattr(stack, "feed", None)
        if feed is not None and feed.poll() is not None:
            return f"the feed exited with {feed.returncode}:\n{stack.logs()}"
        return None
    try:
        wait_for_consumer(url, queue, gone=gone)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.logs()}")


def queue_exists(url: str, queue: str) -> bool:
    with kombu.Connection(url, heartbeat=0) as conn:
        return broker.queue_exists(conn, queue)


def publish_garbage(url: str, pool: str) -> None:
    with kombu.Connection(url, heartbeat=0) as conn:
        channel = conn.channel()
        channel.basic_publish(amqp.Message(b"\xc1 not msgpack",
                                           content_type="application/x-msgpack"),
                              topology.events_exchange(), routing_key=f"job.exited.{pool}")


def documented_permissions() -> tuple[str, str, str]:
    """Return the configure, write and read patterns docs/flower.md gives the feed's user."""
    text = (ROOT / "docs" / "flower.md").read_text(encoding="utf-8")
    found = {m.group(1): m.group(2).replace("\\|", "|")
             for m in re.finditer(r"^\| (configure|write|read) \| `(.+)` \|$", text, re.M)}
    return found["configure"], found["write"], found["read"]


@pytest.fixture
def feed_user_url(rabbitmq_proc: Any, vhost: str) -> Iterator[str]:
    """The URL of a broker user holding only the feed's documented permissions."""
    name, password = f"dashboard-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    rabbitmq_proc.rabbitctl_output("add_user", name, password)
    rabbitmq_proc.rabbitctl_output("set_permissions", "-p", vhost, name,
                                   *documented_permissions())
    yield user_url(rabbitmq_proc, vhost, name, password)
    rabbitmq_proc.rabbitctl_output("delete_user", name)


def _running_stack(stack: Stack, feed_url: str | None = None) -> str:
    """Start ledger, feed, Flower and one worker; return the worker's Flower name."""
    stack.ledger.start("--pool", stack.pool)
    stack.start_feed(feed_url)
    wait_consumed(stack.url, topology.dashboard_queue(), stack)
    stack.start_flower()
    node = f"feed-node-{uuid.uuid4().hex[:6]}"
    stack.start_worker(node)
    worker = f"celery@{node}"
    wait_until(lambda: stack.api("/api/workers?status=1").get(worker) is True,
               "Flower to see the node online", describe=stack.logs)
    return worker


def test_flower_lists_finished_jobs_as_tasks_and_the_node_as_a_worker(
        stack: Stack, feed_user_url: str) -> None:
    worker = _running_stack(stack, feed_user_url)  # the feed as its own, restricted user
    publish_garbage(stack.url, stack.pool)
    with Client(stack.url) as client:
        good = client.submit(JobSpec("echo", ("hello", "flower"), pool=stack.pool))
        bad = client.submit(JobSpec("sh", ("-c", "exit 3"), pool=stack.pool,
                                    name="fails-on-purpose"))
        assert good.wait(timeout_s=30).state is JobState.EXITED
        assert bad.wait(timeout_s=30).exit_code == 3

    ok = wait_until(lambda: stack.task_in(good.job_id, "SUCCESS"), "the echo job in Flower",
                    describe=stack.logs)
    assert ok["name"] == "echo"
    assert "hello" in ok["args"] and "flower" in ok["args"]
    assert ok["worker"] == worker
    assert ok["runtime"] >= 0 and ok["started"] and ok["received"]
    assert ok["result"].startswith("exit code 0")
    failed = wait_until(lambda: stack.task_in(bad.job_id, "FAILURE"), "the failed job",
                        describe=stack.logs)
    assert failed["name"] == "fails-on-purpose"
    assert failed["exception"] == "exit code 3"
    assert failed["worker"] == worker and failed["runtime"] >= 0
    assert "'cmd': 'sh'" in failed["kwargs"]

    def inspected() -> dict[str, Any] | None:  # Flower stores replies after answering
        info: dict[str, Any] = stack.api("/api/workers?refresh=1").get(worker, {})
        return info if {"stats", "active_queues", "registered", "conf"} <= set(info) else None

    info = wait_until(inspected, "Flower to inspect the node", describe=stack.logs)
    assert info["stats"]["total"] == {"echo": 1, "fails-on-purpose": 1}
    assert info["stats"]["pool"]["max-concurrency"] == 2
    assert "password" not in json.dumps(info["stats"]["broker"])
    assert info["stats"]["broker"]["transport"] == "amqp"  # named as the URL names it
    queue = info["active_queues"][0]
    assert queue["name"] == topology.pool_queue(stack.pool)
    assert queue["exchange"]["name"] == topology.jobs_exchange()
    assert queue["routing_key"] == stack.pool
    assert info["registered"] == ["echo", "fails-on-purpose"]
    assert info["conf"]["machine_Machine"] == worker.split("@")[1]
    page = stack.text(f"/worker/{worker}")
    assert page is not None and topology.pool_queue(stack.pool) in page

    metrics = stack.text("/metrics") or ""
    assert (f'flower_events_total{{task="echo",type="task-succeeded",worker="{worker}"}} 1.0'
            in metrics)
    assert (f'flower_events_total{{task="fails-on-purpose",type="task-failed",'
            f'worker="{worker}"}} 1.0' in metrics)
    assert f'flower_worker_online{{worker="{worker}"}} 1.0' in metrics
    assert "dropping an unreadable event" in stack.procs.log("feed")


def test_a_running_job_is_active_on_its_worker_and_a_removed_one_is_revoked(
        stack: Stack) -> None:
    worker = _running_stack(stack)
    with Client(stack.url) as client:
        handle = client.submit(JobSpec("sleep", ("60",), pool=stack.pool, name="long-sleep"))
        wait_until(lambda: stack.task_in(handle.job_id, "STARTED"), "the job to start",
                   describe=stack.logs)

        def active() -> dict[str, Any] | None:  # the next heartbeat lists the job as running
            one: dict[str, Any] = stack.api(
                f"/api/workers?workername={worker}&refresh=1")[worker]
            return one if one["active"] else None

        one = wait_until(active, "the job active on its worker", describe=stack.logs)
        assert [(t["id"], t["name"]) for t in one["active"]] == [(handle.job_id, "long-sleep")]
        assert one["active"][0]["delivery_info"]["routing_key"] == stack.pool
        assert one["scheduled"] == [] and one["reserved"] == []
        done = _dispatch_cli(stack.url, "rm", handle.job_id, "--reason", "not needed")
        assert done.returncode == 0, done.stderr
        assert handle.wait(timeout_s=30).state is JobState.REMOVED

    revoked = wait_until(lambda: stack.task_in(handle.job_id, "REVOKED"), "the job revoked",
                         describe=stack.logs)
    assert revoked["exception"].startswith("removed by guest")
    assert "not needed" in revoked["exception"]
    one = stack.api(f"/api/workers?workername={worker}&refresh=1")[worker]
    assert one["revoked"] == [handle.job_id]

    stack.workers.stop_all()
    wait_until(lambda: stack.api("/api/workers?status=1").get(worker) is False,
               "Flower to see the node go offline", describe=stack.logs)
    metrics = stack.text("/metrics") or ""
    assert f'flower_worker_online{{worker="{worker}"}} 0.0' in metrics
    assert "pidbox command error" not in stack.procs.log("feed")


def test_the_feed_waits_for_the_ledger_so_nodes_never_take_it_for_one(stack: Stack) -> None:
    feed = stack.start_feed()
    wait_until(lambda: "waiting for the ledger's queue" in stack.procs.log("feed"),
               "the feed to wait for the ledger", describe=stack.logs)
    assert feed.poll() is None
    assert not queue_exists(stack.url, topology.dashboard_queue())
    stack.ledger.start()
    wait_consumed(stack.url, topology.dashboard_queue(), stack)


def _dispatch_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False,
                          env={**os.environ, "DISPATCH_BROKER_URL": url})


def test_the_feed_comes_back_after_the_broker_drops_every_connection(
        stack: Stack, rabbitmq_proc: Any, vhost: str) -> None:
    worker = _running_stack(stack)
    rabbitmq_proc.rabbitctl_output("close_all_connections", "-p", vhost, "test: broker restart")
    wait_until(lambda: "starting again" in stack.procs.log("feed"), "the feed to reconnect",
               describe=stack.logs)
    wait_consumed(stack.url, topology.dashboard_queue(), stack)
    wait_until(lambda: stack.api("/api/workers?status=1").get(worker) is True,
               "Flower to see the node again", describe=stack.logs)
    with Client(stack.url) as client:
        handle = client.submit(JobSpec("true", pool=stack.pool, name="after-the-drop"))
        assert handle.wait(timeout_s=30).state is JobState.EXITED
    task = wait_until(lambda: stack.task_in(handle.job_id, "SUCCESS"), "the job in Flower",
                      describe=stack.logs)
    assert task["name"] == "after-the-drop" and task["worker"] == worker
    assert stack.feed.poll() is None  # the feed lived through it
