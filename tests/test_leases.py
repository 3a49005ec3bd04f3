"""Long jobs do not depend on consumer_timeout, and a node that dies costs one re-run.

The test broker's ``consumer_timeout`` is 3 s (tests/rabbitmq/rabbitmq.conf): a job
message left unacked longer than that would be taken back and run again. Claims hand
the job to the ledger and ack it at once; heartbeats renew its lease.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.client import Client
from dispatch.job import JobSpec, JobState, JobUpdate
from dispatch.ledger.records import LedgerState

from conftest import Workers

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = ("--heartbeat-interval", "0.5")


@pytest.fixture
def vhost_workers(vhost_url: str, workdir_root: Path, tmp_path: Path):
    workers = Workers(vhost_url, workdir_root, tmp_path / "workers")
    (tmp_path / "workers").mkdir()
    yield workers
    workers.stop_all()


def _kill_mid_job(workers: Workers, url: str, pool: str, seconds: str, *,
                  before_kill: Callable[[str], object] = lambda _job_id: None,
                  ) -> list[JobUpdate]:
    """Run a job on node "doomed", SIGKILL that node, start "survivor"; return all updates."""
    first = workers.start(*HEARTBEAT, "--name", "doomed", pools=(pool,), slots=1)
    with Client(url) as client:
        handle = client.submit(JobSpec("sleep", (seconds,), pool=pool))
        running = next(handle.updates(timeout_s=30))
        assert (running.state, running.host) == (JobState.RUNNING, "doomed")
        before_kill(handle.job_id)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        workers.start(*HEARTBEAT, "--name", "survivor", pools=(pool,), slots=1)
        return [running, *handle.updates(timeout_s=60)]


def test_a_job_much_longer_than_consumer_timeout_runs_once(ledger_service, vhost_workers,
                                                           vhost_url, pool):
    ledger_service.start("--pool", pool)
    vhost_workers.start(*HEARTBEAT, pools=(pool,))
    with Client(vhost_url) as client:
        handle = client.submit(JobSpec("sleep", ("8",), pool=pool))
        updates = list(handle.updates(timeout_s=60))
    assert [(u.state, u.attempt) for u in updates] == [(JobState.RUNNING, 1),
                                                       (JobState.EXITED, 1)]
    assert updates[-1].exit_code == 0
    assert "redelivered" not in vhost_workers.log()
    record = ledger_service.wait_for(
        lambda led: (r := led.job(handle.job_id)) and r.state is LedgerState.EXITED and r)
    assert (record.attempt, record.exit_code) == (1, 0)


def test_a_node_killed_mid_job_costs_exactly_one_rerun_and_one_result(ledger_service,
                                                                      vhost_workers,
                                                                      vhost_url, pool):
    ledger_service.start("--pool", pool)
    updates = _kill_mid_job(vhost_workers, vhost_url, pool, "2", before_kill=lambda job_id:
                            ledger_service.wait_for(lambda led: (r := led.job(job_id))
                                                    and r.host == "doomed"))
    job_id = updates[0].job_id
    # The claim reached the ledger, so the job message was acked: the broker has
    # nothing to redeliver, and the ledger sends attempt 2 once the lease runs out.
    assert [(u.state, u.attempt, u.host) for u in updates] == [
        (JobState.RUNNING, 1, "doomed"),
        (JobState.IDLE, 2, None),
        (JobState.RUNNING, 2, "survivor"),
        (JobState.EXITED, 2, "survivor"),
    ]
    assert "doomed" in (updates[1].reason or "")
    record = ledger_service.wait_for(
        lambda led: (r := led.job(job_id)) and r.state is LedgerState.EXITED and r)
    assert (record.attempt, record.host, record.exit_code) == (2, "survivor", 0)


def test_a_node_killed_before_its_claim_lands_is_covered_by_the_broker(vhost_workers,
                                                                       vhost_url, pool):
    """Without a ledger to claim with, the job stays unacked: the broker hands it on."""
    updates = _kill_mid_job(vhost_workers, vhost_url, pool, "1")
    assert [(u.state, u.attempt, u.host) for u in updates] == [
        (JobState.RUNNING, 1, "doomed"),
        (JobState.RUNNING, 1, "survivor"),
        (JobState.EXITED, 1, "survivor"),
    ]


def test_a_ledger_started_after_the_nodes_still_sees_every_job(ledger_service, vhost_workers,
                                                               vhost_url, pool):
    # The node starts with nobody listening to its events (heartbeats every 10 s);
    # the ledger's start-up sync tells it at once that someone keeps them now.
    vhost_workers.start(pools=(pool,))
    ledger_service.start("--pool", pool)
    with Client(vhost_url) as client:
        result = client.submit(JobSpec("true", pool=pool)).wait(timeout_s=30)
    record = ledger_service.wait_for(
        lambda led: (r := led.job(result.job_id)) and r.state is LedgerState.EXITED and r,
        timeout_s=5)
    assert record.host == result.host
