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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import Tally, collect_finals, counting_job, executions
from fixtures_ledger import LedgerProcess

from dispatch.client import Client
from dispatch.ledger.records import LedgerState

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
