"""Flower, as a real process against the test broker, lists the cloud plane's Celery tasks."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cloud_fixtures import Processes, wait_until
from openstack_double import PASSWORD, OpenStackDouble
from sshd import free_port

from workers.cloud.app import PROVISION_TASK, REAP_TASK, make_app
from workers.cloud.settings import CloudSettings


@pytest.fixture
def sender(cloud_env: dict[str, str]) -> Iterator[Any]:
    app = make_app(CloudSettings.from_env(cloud_env))
    yield app
    app.close()


def tasks(port: int) -> dict[str, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=5) as reply:
            data: dict[str, dict[str, Any]] = json.load(reply)
            return data
    except OSError:
        return {}


def test_flower_lists_the_reap_and_provision_tasks_through_its_api(
        cloud_double: OpenStackDouble, cloud_procs: Processes, cloud_env: dict[str, str],
        sender: Any) -> None:
    port = free_port()
    cloud_procs.celery_worker()
    cloud_procs.start("flower", "celery", "-A", "workers.cloud.app", "flower",
                      f"--port={port}", "--address=127.0.0.1",
                      env={**cloud_env, "FLOWER_UNAUTHENTICATED_API": "true"})
    queue = cloud_env["DISPATCH_CLOUD_TASK_QUEUE"]

    def reap_listed() -> bool:  # Flower sees only what happens once it listens: send until seen
        if not any(t["name"] == REAP_TASK and t["state"] == "SUCCESS"
                   for t in tasks(port).values()):
            sender.send_task(REAP_TASK, queue=queue)
            return False
        return True

    wait_until(reap_listed, "Flower to list a reap task", timeout_s=40,
               describe=cloud_procs.logs)
    sender.send_task(PROVISION_TASK, args=["flower-pool"], kwargs={"count": 1, "cpus": 2},
                     queue=queue)
    done = wait_until(lambda: [t for t in tasks(port).values()
                               if t["name"] == PROVISION_TASK and t["state"] == "SUCCESS"],
                      "Flower to list the provision task", describe=cloud_procs.logs)
    assert "flower-pool" in done[0]["args"]
    assert "dispatch-flower-pool-" in done[0]["result"]
    assert [s for s in cloud_double.server_names() if s.startswith("dispatch-flower-pool-")]
    assert PASSWORD not in cloud_procs.logs()
