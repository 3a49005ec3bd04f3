"""Dispatch on a three-node RabbitMQ cluster with quorum queues: a leader lost mid-stream.

The cluster (tests/rabbitmq_cluster.py) is started once for this module, about 20 s.
Workers and the client get all three URLs; the node that holds the pool queue's leader
is stopped while jobs stream through, and every confirmed job must still get exactly
one final reply.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
from rabbitmq_cluster import Cluster, Node

from dispatch import broker, topology
from dispatch.client import Client
from dispatch.job import JobSpec, JobState, JobUpdate

from conftest import Workers

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

JOBS = 200
BATCH = 10
#: Jobs submitted before the leader's node is stopped.
STOP_AFTER = 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three clustered RabbitMQ nodes, torn down (and their directory removed) even on failure."""
    nodes = Cluster()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quorum queues for this test's client and the workers it starts."""
    monkeypatch.setenv("DISPATCH_QUEUE_TYPE", "quorum")


def urls_from(cluster: Cluster, first: Node) -> str:
    """Return the cluster's URLs, ``first``'s first (the node a process connects to)."""
    i = cluster.nodes.index(first)
    return ";".join(n.url for n in cluster.nodes[i:] + cluster.nodes[:i])


def collect_finals(client: Client, job_ids: set[str],
                   timeout_s: float) -> dict[str, list[JobUpdate]]:
    """Return every final reply that arrives for ``job_ids`` within ``timeout_s``."""
    finals: dict[str, list[JobUpdate]] = collections.defaultdict(list)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        missing = job_ids - finals.keys()
        # Once all are in, listen a little longer: a duplicate would arrive now.
        if not missing and time.monotonic() > deadline - timeout_s + 1:
            deadline = min(deadline, time.monotonic() + 3)
        update = client.next_update(timeout_s=0.5)
        if update is not None and update.is_final:
            finals[update.job_id].append(update)
    return finals


def test_a_leader_node_stopped_mid_stream_loses_no_job_and_duplicates_no_result(
        cluster: Cluster, quorum: None, workdir_root: Path, tmp_path: Path) -> None:
    pool = "cluster"
    counter = workdir_root.parent / f"{workdir_root.name}.runs-{uuid.uuid4().hex[:8]}"
    counter.touch()  # outside every job directory; the jobs run as nobody
    counter.chmod(0o666)
    queue = topology.pool_queue(pool)
    crew = []
    for i, node in enumerate(cluster.nodes[:2]):  # one worker on each of two nodes
        log_dir = tmp_path / f"w{i}"
        log_dir.mkdir()
        w = Workers(urls_from(cluster, node), workdir_root, log_dir)
        crew.append(w)
    try:
        crew[0].start(pools=(pool,), wait_for=queue, slots=2)
        crew[1].start(pools=(pool,), wait_for=queue, slots=2)
        leader = cluster.leader_of(queue)
        # The client starts on the leader's node too: it must fail over as well.
        with Client(urls_from(cluster, leader)) as client:
            submitted: set[str] = set()
            stopper: threading.Thread | None = None
            after_stop = 0
            down = threading.Event()
            started = time.monotonic()
            for first in range(0, JOBS, BATCH):
                specs = [JobSpec("sh", ("-c", f"echo {i} >> {counter}"), pool=pool,
                                 job_id=f"c{i:04d}") for i in range(first, first + BATCH)]
                handles = client.submit_many(specs)
                submitted.update(h.job_id for h in handles)
                if first + BATCH == STOP_AFTER:
                    stopper = threading.Thread(target=cluster.stop_node, args=(leader, down))
                    stopper.start()
                elif down.is_set() and not after_stop:
                    after_stop = JOBS - first  # this batch went to a cluster without it
                time.sleep(0.25)
            finals = collect_finals(client, submitted, timeout_s=120)
            elapsed = time.monotonic() - started
            assert stopper is not None
            stopper.join(timeout=60)
            new_leader = cluster.leader_of(queue)
    finally:
        for w in crew:
            w.stop_all()
        runs = collections.Counter(counter.read_text().split())
        counter.unlink()

    lost = sorted(submitted - finals.keys())
    duplicated = sorted(j for j, f in finals.items() if len(f) > 1)
    print(f"cluster: {len(submitted)} jobs in {elapsed:.1f} s, leader {leader.name} stopped "
          f"after {STOP_AFTER} ({after_stop} submitted once it was down), new leader "
          f"{new_leader.name}; lost {len(lost)}, duplicate "
          f"results {len(duplicated)}, executions {sum(runs.values())}, "
          f"run twice {sum(1 for n in runs.values() if n > 1)}")
    assert len(submitted) == JOBS
    assert new_leader is not leader
    assert after_stop > 0, "the stream ended before the node was down"
    assert not lost, f"no final reply for {lost[:10]}"
    assert not duplicated, f"more than one final reply for {duplicated[:10]}"
    assert all(u.state is JobState.EXITED and u.exit_code == 0
               for f in finals.values() for u in f)
    assert sorted(runs) == sorted(str(i) for i in range(JOBS)), "a job never ran"


def test_a_quorum_pool_has_a_queue_a_priority_level_and_a_worker_serves_them_all(
        cluster: Cluster, quorum: None, workdir_root: Path, tmp_path: Path) -> None:
    pool = "levels"
    url = cluster.urls
    crew = Workers(url, workdir_root, tmp_path)
    node = next(n for n in cluster.nodes if n.running)
    with kombu.Connection(node.url, heartbeat=0) as conn, Client(url) as client:
        levels = broker.declare_pool_queues(conn.default_channel, pool)
        try:
            handles = {p: client.submit(JobSpec("true", pool=pool, priority=p)) for p in (9, 4, 1)}
            depths = {level: conn.default_channel.queue_declare(queue, passive=True)[1]
                      for level, queue in levels}
            assert [level for level, _ in levels] == ["high", "normal", "low"]
            assert depths == {"high": 1, "normal": 1, "low": 1}
            crew.start(pools=(pool,), slots=1)
            for handle in handles.values():
                assert handle.wait(timeout_s=60).exit_code == 0
        finally:
            crew.stop_all()
