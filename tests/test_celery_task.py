"""A Celery task can submit a Dispatch job and return its exit code."""

from __future__ import annotations

import logging

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from dispatch.client import Client
from dispatch.job import JobSpec

pytestmark = pytest.mark.timeout(90)


def test_a_celery_task_submits_a_job_and_returns_its_exit_code(worker, broker_url, pool):
    app = Celery("dispatch_test_tasks", broker=broker_url, backend="rpc://")
    app.conf.update(broker_heartbeat=0, accept_content=["json"], task_serializer="json",
                    result_serializer="json", result_accept_content=["json"],
                    worker_hijack_root_logger=False)

    @app.task(name="tests.run_job")
    def run_job(pool_name: str, code: int) -> int | None:
        with Client(broker_url) as client:
            spec = JobSpec("/bin/sh", ("-c", f"exit {code}"), pool=pool_name)
            return client.submit(spec).wait(timeout_s=30).exit_code

    root_level = logging.getLogger().level
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert run_job.delay(pool, 7).get(timeout=60) == 7
    finally:  # the embedded worker sets the root logger's level: give it back
        logging.getLogger().setLevel(root_level)
