"""Workers and clients ride out a broker restart; a job running meanwhile runs once."""

from __future__ import annotations

import time

import pytest

from dispatch.errors import UnroutableError
from dispatch.job import JobSpec, JobState

pytestmark = pytest.mark.timeout(120)


def _restart_broker(rabbitmq_proc) -> None:
    rabbitmq_proc.rabbitctl_output("stop_app")
    rabbitmq_proc.rabbitctl_output("start_app")


def test_a_job_running_through_a_broker_restart_reports_once_and_new_jobs_still_run(
        rabbitmq_proc, worker, client, pool):
    handle = client.submit(JobSpec("sleep", ("3",), pool=pool))
    assert next(handle.updates(timeout_s=30)).state is JobState.RUNNING
    _restart_broker(rabbitmq_proc)

    result = handle.wait(timeout_s=60)
    assert result.state is JobState.EXITED and result.exit_code == 0

    after = client.submit(JobSpec("echo", ("after restart",), pool=pool)).wait(timeout_s=60)
    assert after.exit_code == 0
    # Exactly one final reply for the job that lived through the restart.
    assert client.next_update([handle.job_id], timeout_s=2) is None


def test_a_job_that_ends_while_the_broker_is_down_runs_once(rabbitmq_proc, worker, client,
                                                            pool):
    # The node reconnects, reports the finished job and receives its redelivery in the
    # same breath: the redelivery must join the result on its way, not run again.
    handle = client.submit(JobSpec("sleep", ("1",), pool=pool))
    assert next(handle.updates(timeout_s=30)).state is JobState.RUNNING
    rabbitmq_proc.rabbitctl_output("stop_app")
    time.sleep(2)  # the job ends while the broker is away
    rabbitmq_proc.rabbitctl_output("start_app")

    result = handle.wait(timeout_s=60)
    assert result.state is JobState.EXITED and result.exit_code == 0
    assert client.next_update([handle.job_id], timeout_s=3) is None


def test_a_client_idle_through_a_broker_restart_submits_on_a_new_connection(
        rabbitmq_proc, worker, client, pool):
    assert client.submit(JobSpec("true", pool=pool)).wait(timeout_s=30).exit_code == 0
    _restart_broker(rabbitmq_proc)
    # Nothing has read the dead connection since: the submit itself finds it gone,
    # reconnects and publishes again.
    deadline = time.monotonic() + 30
    worker_back = False
    while not worker_back:  # the node needs a moment to bind its pool again
        try:
            handle = client.submit(JobSpec("echo", ("again",), pool=pool))
            worker_back = True
        except UnroutableError:  # the pool is unknown until the node is back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert handle.wait(timeout_s=60).exit_code == 0
