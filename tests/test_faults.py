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

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import QUIET_S, Tally, collect_finals, counting_job, executions, rss_kib
from fixtures_ledger import LedgerProcess

from dispatch import headers
from dispatch.client import Client
from dispatch.job import JobSpec, JobState
from dispatch.ledger.records import LedgerState

from amqp_helpers import publish_job
from conftest import Workers

pytestmark = pytest.mark.timeout(180)

HEARTBEAT = ("--heartbeat-interval", "0.5")  # a lease is three of them: 1.5 s
#: Batches of 100, not 1,000: a full batch of padded requests (scenario 5) would be a
#: high-water mark of the ledger's memory as large as the leak looked for.
LEDGER_ARGS = ("--batch-max", "100")


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
    ledger.start(*LEDGER_ARGS, "--pool", pool)
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


# -- 5. many small jobs: memory ---------------------------------------------------------

RSS_JOBS = 5000
PAD_BYTES = 8192  # each request carries 8 KiB: a process that kept them would show it
#: 2,500 requests of 8 KiB kept by a node or the ledger would add 20 MiB to it.
RSS_GROWTH_LIMIT_KIB = 10 * 1024


def _rss(cluster: Cluster) -> dict[str, int]:
    found = {_node_name(cluster, n): rss_kib(n.pid) for n in cluster.nodes}
    assert cluster.ledger.proc is not None
    found["ledger"] = rss_kib(cluster.ledger.proc.pid)
    return found


def _wait_recorded(cluster: Cluster, job_ids: set[str], timeout_s: float = 120) -> None:
    """Wait until the ledger has every job of ``job_ids`` as exited (counted in SQL)."""
    deadline = time.monotonic() + timeout_s
    led = cluster.ledger.ledger()
    try:
        while True:
            done = {r.job_id for r in led.jobs(pool=cluster.pool, states=[LedgerState.EXITED])}
            if job_ids <= done:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ledger has {len(job_ids & done)} of {len(job_ids)} exited")
            time.sleep(0.5)
    finally:
        led.close()


def test_5000_small_jobs_through_two_nodes_leave_no_job_in_memory(cluster, counters):
    """Claimed jobs: at-least-once execution, exactly-once final; RSS recorded.

    RSS is taken after a warm-up of 500 jobs, halfway and at the end. Buffers that grow
    to their high-water mark with the first full batches are no leak; growth over the
    second half would be one.
    """
    cluster.keep_nodes(2)
    count = counters / "many"
    tally = Tally(f"{RSS_JOBS} small jobs (ledger, 2 nodes)", submitted=RSS_JOBS,
                  guarantee="at-least-once execution, exactly-once final")
    job = counting_job(count, cluster.pool, pad_bytes=PAD_BYTES)
    rss: list[dict[str, int]] = []
    with Client(cluster.url) as client:
        warm = {h.job_id for h in client.submit_many([counting_job(
            counters / "warm", cluster.pool, pad_bytes=PAD_BYTES)] * 500)}
        collect_finals(client, Tally("warm-up"), warm, timeout_s=120)
        _wait_recorded(cluster, warm)
        rss.append(_rss(cluster))
        for _half in range(2):
            ids = {h.job_id for h in client.submit_many([job] * (RSS_JOBS // 2))}
            tally.confirmed |= ids
            collect_finals(client, tally, ids, timeout_s=150)
            _wait_recorded(cluster, ids)
            rss.append(_rss(cluster))
    tally.started = executions(count)
    tally.extra["rss_kib"] = dict(zip(("warm", "half", "end"), rss, strict=True))
    _assert_exactly_once(tally)
    growth = {name: rss[2][name] - rss[1][name] for name in rss[0]}
    assert all(kib < RSS_GROWTH_LIMIT_KIB for kib in growth.values()), rss


# -- 4. the ledger SIGKILLed and started again ----------------------------------------


def test_a_ledger_killed_and_restarted_mid_stream_loses_no_final_and_no_record(
        cluster, counters):
    """Claims wait in the ledger's durable queue; leases are judged after the backlog."""
    cluster.keep_nodes(2)
    count = counters / "ledger-kill"
    tally = Tally("ledger SIGKILL and restart mid-stream (2 nodes)", submitted=200,
                  guarantee="at-least-once execution, exactly-once final")
    killed, back = threading.Event(), threading.Event()
    kill_at, restart_at = threading.Event(), threading.Event()

    def fault() -> None:
        if not kill_at.wait(timeout=120):
            return
        assert cluster.ledger.proc is not None
        cluster.ledger.proc.send_signal(signal.SIGKILL)
        cluster.ledger.proc.wait(timeout=10)
        tally.extra["finals_at_kill"] = len(tally.finals)
        killed.set()
        restart_at.wait(timeout=120)
        tally.extra["finals_at_restart"] = len(tally.finals)
        cluster.ledger.start(*LEDGER_ARGS, "--pool", cluster.pool)
        back.set()

    thread = threading.Thread(target=fault, daemon=True)
    thread.start()

    def on_final(done: int) -> None:
        if done >= 40:
            kill_at.set()
        if done >= 120 and killed.is_set():
            restart_at.set()

    with Client(cluster.url) as client:
        handles = client.submit_many([counting_job(count, cluster.pool, sleep_s=0.1)] * 200)
        tally.confirmed = {h.job_id for h in handles}
        collect_finals(client, tally, tally.confirmed, timeout_s=150, on_final=on_final)
    restart_at.set()  # should every job have ended first
    thread.join(timeout=60)
    assert back.is_set()
    records = _ledger_finals(cluster, tally.confirmed)
    tally.started = executions(count)
    tally.extra["ledger_reruns"] = sum(r.attempt > 1 for r in records.values())
    _assert_exactly_once(tally)


# -- 3. the client killed after its submits were confirmed ----------------------------


def test_a_client_killed_after_its_submits_are_confirmed_finds_every_result_later(
        workers, pool, counters, broker_url, tmp_path, amqp):
    """Results wait in the client's durable reply queue; ``dispatch wait ID`` takes them."""
    count, gate = counters / "client-kill", counters / "client-kill.gate"
    for _ in range(2):
        workers.start(pools=(pool,))
    client_id = f"faults-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DISPATCH_BROKER_URL": broker_url,
           "DISPATCH_CONFIG_DIR": str(tmp_path / "config")}
    script = counting_job(count, pool, gate=gate).arguments[1]
    tally = Tally("client SIGKILLed after confirmed submits, results fetched later",
                  submitted=20, guarantee="at-least-once execution, exactly-once final")
    with (tmp_path / "submit.err").open("wb") as err:
        submit = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "submit", "--array", "20", "--wait",
             "--client-id", client_id, "--pool", pool, "-e", f"COUNT_FILE={count}",
             "-c", script], stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path)
    assert submit.stdout is not None
    array_id = submit.stdout.readline().decode().strip()  # printed once all are confirmed
    submit.send_signal(signal.SIGKILL)
    submit.wait(timeout=10)
    submit.stdout.close()
    assert array_id, (tmp_path / "submit.err").read_text()
    tally.confirmed = {f"{array_id}.{i}" for i in range(20)}
    gate.touch()
    fetched = subprocess.run(
        [sys.executable, "-m", "dispatch", "wait", *sorted(tally.confirmed), "--client-id",
         client_id, "--json", "--timeout", "120"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150, check=False)
    for line in fetched.stdout.splitlines():
        record = json.loads(line)
        if record.get("state") in {s.value for s in JobState if s.is_final}:
            tally.finals[record["job_id"]] += 1
    # Anything left in the reply queue that is final would be a second result.
    with Client(broker_url, client_id=client_id) as later:
        while (update := later.next_update(None, QUIET_S)) is not None:
            tally.note(update)
    tally.started = executions(count)
    _assert_exactly_once(tally)
    assert fetched.returncode == 0, fetched.stderr


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
