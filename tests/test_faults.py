"""Faults on purpose: every confirmed job ends with exactly one final result.

Real broker, real nodes, real ledger, real clients as subprocesses. Each scenario
counts what was submitted and confirmed, the final results the client was handed,
duplicates among them, and how many times each job really started (each job notes
its start in a counter file outside its working directory). No scenario may lose a
final or hand out two; extra executions are allowed where the guarantee is
at-least-once, and are counted. Figures: ``DISPATCH_FAULT_FIGURES=path`` (one JSON
line per scenario run), summed up in docs/reliability.md.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import Tally, collect_finals, counting_job, executions
from fixtures_ledger import LedgerProcess

from dispatch import headers
from dispatch.client import Client
from dispatch.job import JobSpec, JobState
from dispatch.ledger.records import LedgerState

from amqp_helpers import publish_job
from conftest import Workers

pytestmark = pytest.mark.timeout(180)

HEARTBEAT = ("--heartbeat-interval", "0.5")  # a lease is three of them: 1.5 s


@pytest.fixture(scope="module")
def counters(workdir_root: Path) -> Iterator[Path]:
    """A directory outside every job's working directory that the job account can write."""
    path = Path(tempfile.mkdtemp(prefix="faults-", dir=workdir_root.parent))
    path.chmod(0o1777)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _vhost(rabbitmq_proc: Any) -> tuple[str, str]:
    name = f"faults-{uuid.uuid4().hex[:10]}"
    rabbitmq_proc.rabbitctl_output("add_vhost", name)
    rabbitmq_proc.rabbitctl_output("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name, f"amqp://guest:guest@{rabbitmq_proc.host}:{rabbitmq_proc.port}/{name}"


@dataclass
class Cluster:
    """A vhost with a ledger and execute nodes, shared by a module's tests."""

    url: str
    pool: str
    ledger: LedgerProcess
    workers: Workers
    nodes: list[subprocess.Popen[bytes]]

    def keep_nodes(self, count: int) -> None:
        """Start nodes until ``count`` of them are alive."""
        self.nodes = [n for n in self.nodes if n.poll() is None]
        while len(self.nodes) < count:
            self.nodes.append(self.workers.start(*HEARTBEAT, pools=(self.pool,)))


@pytest.fixture(scope="module")
def cluster(rabbitmq_proc: Any, workdir_root: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private vhost, a ``dispatch ledger`` on SQLite and two nodes of two slots."""
    vhost, url = _vhost(rabbitmq_proc)
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "workers").mkdir()
    pool = f"f-{uuid.uuid4().hex[:8]}"
    ledger = LedgerProcess(url, f"sqlite:///{tmp / 'ledger.db'}", tmp / "ledger.log")
    ledger.start("--pool", pool)
    workers = Workers(url, workdir_root, tmp / "workers")
    found = Cluster(url, pool, ledger, workers, [])
    try:
        found.keep_nodes(2)
        yield found
    finally:
        workers.stop_all()
        ledger.stop()
        rabbitmq_proc.rabbitctl_output("delete_vhost", vhost)


def _ledger_finals(cluster: Cluster, job_ids: set[str]) -> dict[str, Any]:
    """Wait until the ledger has every job as exited; return their records."""
    def all_exited(led: Any) -> dict[str, Any] | None:
        records = {j: led.job(j) for j in job_ids}
        if all(r is not None and r.state is LedgerState.EXITED for r in records.values()):
            return records
        return None

    return cluster.ledger.wait_for(all_exited, timeout_s=60)


def _assert_exactly_once(tally: Tally) -> None:
    figures = tally.record()
    assert tally.lost == 0, figures
    assert tally.duplicates == 0, figures
    assert not set(tally.finals) - tally.confirmed, figures
    assert set(tally.started) >= tally.confirmed, figures  # every job really ran


# -- 1. a node SIGKILLed mid-job -------------------------------------------------------


@pytest.mark.parametrize("run", range(1, 6))
def test_a_node_killed_mid_job_loses_no_final_and_hands_out_none_twice(
        cluster, counters, run):
    """At-least-once execution (a killed job runs again), exactly one final result."""
    cluster.keep_nodes(2)
    count, gate = counters / f"kill-{run}", counters / f"kill-{run}.gate"
    tally = Tally("node SIGKILL mid-job (ledger, 2 nodes)", run=run, submitted=6,
                  guarantee="at-least-once execution, exactly-once final")
    victim = cluster.nodes[0]
    with Client(cluster.url) as client:
        handles = client.submit_many([counting_job(count, cluster.pool, gate=gate)] * 6)
        tally.confirmed = {h.job_id for h in handles}
        # Wait for the ledger to hold a claim of the victim's: its jobs are mid-run
        # (they wait for the gate) and acked, so only the lease can bring them back.
        victim_name = _node_name(cluster, victim)
        doomed = cluster.ledger.wait_for(lambda led: [
            r.job_id for j in tally.confirmed if (r := led.job(j)) is not None
            and r.host == victim_name and r.state in (LedgerState.CLAIMED, LedgerState.RUNNING)])
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        gate.touch()
        cluster.keep_nodes(2)
        collect_finals(client, tally, tally.confirmed, timeout_s=90)
    tally.started = executions(count)
    records = _ledger_finals(cluster, tally.confirmed)
    tally.extra["killed_mid_job"] = len(doomed)
    _assert_exactly_once(tally)
    # The jobs the victim had claimed came back by their lease, as attempt 2.
    assert all(records[j].attempt == 2 for j in doomed), {j: records[j] for j in doomed}


def _node_name(cluster: Cluster, proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    assert isinstance(args, list)
    return str(args[args.index("--name") + 1])


# -- 2. the broker restarted under load ------------------------------------------------


def test_a_broker_restart_with_200_jobs_queued_and_running_loses_no_final(
        rabbitmq_proc, workers, pool, counters, broker_url, caplog):
    """No ledger: jobs stay unacked until their final is confirmed (at-least-once)."""
    count = counters / "restart"
    for _ in range(2):
        workers.start(pools=(pool,))
    tally = Tally("broker restart, 200 jobs queued and running (no ledger, 2 nodes)",
                  submitted=200, guarantee="at-least-once execution, exactly-once final")
    trigger, restarted = threading.Event(), threading.Event()

    def restart() -> None:
        if not trigger.wait(timeout=120):
            return
        tally.extra["finals_before_restart"] = len(tally.finals)
        rabbitmq_proc.rabbitctl_output("stop_app")
        rabbitmq_proc.rabbitctl_output("start_app")
        restarted.set()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    with Client(broker_url) as client:
        handles = client.submit_many([counting_job(count, pool, sleep_s=0.1)] * 200)
        tally.confirmed = {h.job_id for h in handles}
        # The client keeps waiting (in next_update) while another thread restarts the
        # broker once 40 finals are in: about 160 jobs are then queued or running.
        collect_finals(client, tally, tally.confirmed, timeout_s=150,
                       on_final=lambda done: done >= 40 and trigger.set())
    thread.join(timeout=60)
    assert restarted.is_set()
    tally.started = executions(count)
    # A job running at the restart goes back to the queue unacked; the other node may
    # take it and run it too. Its second final reaches the reply queue, and the client
    # drops it as already handed out: counted here, never handed out.
    tally.extra["second_finals_dropped_by_client"] = sum(
        "Exited reply" in r.getMessage() and "already handed out" in r.getMessage()
        for r in caplog.records)
    _assert_exactly_once(tally)
    assert tally.extra["finals_before_restart"] < 200


# -- what the suite found in the client ------------------------------------------------


def test_a_client_waiting_while_the_broker_is_down_gets_its_result_once_it_is_back(
        rabbitmq_proc, worker, client, pool):
    handle = client.submit(JobSpec("sleep", ("2",), pool=pool))
    assert next(handle.updates(timeout_s=30)).state is JobState.RUNNING

    def outage() -> None:
        rabbitmq_proc.rabbitctl_output("stop_app")
        time.sleep(3)  # the client is waiting all along; the job ends meanwhile
        rabbitmq_proc.rabbitctl_output("start_app")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = handle.wait(timeout_s=90)  # used to raise BrokerUnreachableError
    thread.join(timeout=60)
    assert (result.state, result.exit_code) == (JobState.EXITED, 0)


def test_a_second_final_of_a_finished_attempt_is_dropped_not_handed_out(amqp, client):
    def reply(job_id: str, host: str, state: JobState = JobState.EXITED,
              attempt: int = 1) -> None:
        env = headers.envelope({"message_id": job_id}, {"Cmd": "true"})
        raw = headers.reply_headers(state, env, exit_code=0, host=host, attempt=attempt)
        publish_job(amqp, client.reply_queue, raw, exchange="")

    reply("twice", "n1")
    reply("twice", "n2", JobState.RUNNING)  # the second run, on another node...
    reply("twice", "n2")  # ...and its final
    reply("other", "n1")
    first = client.next_update(["twice"], timeout_s=20)
    assert first is not None and (first.state, first.host) == (JobState.EXITED, "n1")
    assert client.next_update(["twice"], timeout_s=1) is None
    assert client.next_update(["other"], timeout_s=20) is not None
    # A later attempt (the ledger sent the job out again) is news, not a duplicate.
    reply("twice", "n3", attempt=2)
    again = client.next_update(["twice"], timeout_s=20)
    assert again is not None and (again.host, again.attempt) == ("n3", 2)
