"""Fallback pools: a job whose pool has no live node moves to the first live fallback.

Real ``dispatch ledger --pools`` and ``dispatch worker`` processes on a private vhost;
the pools file gives pool A a fallback_after of 2 s. Waits are on conditions, bounded.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest
from ledger_events import T0, heartbeat, request

from dispatch import headers, topology
from dispatch.client import Client
from dispatch.job import JobSpec, JobState, Nodes, Resources
from dispatch.jobfile import spec_from_fields
from dispatch.ledger import Ledger, LedgerState
from dispatch.ledger.fallback import REROUTED, explain_notes, liveness, save_policies
from dispatch.ledger.records import NodeRecord
from dispatch.pools import PoolPolicy, PoolsFileError, job_kind, parse_pools

from conftest import ROOT, Workers

pytestmark = pytest.mark.timeout(150)

HEARTBEAT = ("--heartbeat-interval", "0.5")


@pytest.fixture
def pools(pool: str) -> tuple[str, str, str, str]:
    """Pool A (no node at first), and B, C and D: A's fallbacks."""
    return f"{pool}-a", f"{pool}-b", f"{pool}-c", f"{pool}-d"


@pytest.fixture
def pools_file(tmp_path: Path, pools: tuple[str, str, str, str]) -> Path:
    a, b, c, d = pools
    path = tmp_path / "pools.yaml"
    path.write_text(f"pools:\n"
                    f"  {a}:\n"
                    f"    fallback_after: 2s\n"
                    f"    fallbacks: {{serial: [{c}, {b}], smp: [{c}], mpi: [{d}]}}\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def crew(vhost_url: str, workdir_root: Path, tmp_path: Path) -> Iterator[Workers]:
    (tmp_path / "workers").mkdir()
    workers = Workers(vhost_url, workdir_root, tmp_path / "workers")
    yield workers
    workers.stop_all()


def _cli(url: str, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = Path(db_url.removeprefix("sqlite:///")).parent / "config"
    env = {**os.environ, "DISPATCH_BROKER_URL": url, "DISPATCH_LEDGER_URL": db_url,
           "DISPATCH_CONFIG_DIR": str(config)}
    return subprocess.run([sys.executable, "-m", "dispatch", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def _rerouted(led: Ledger, job_id: str) -> list[str]:
    return [e.detail or "" for e in led.history(job_id) if e.event == REROUTED]


def test_a_job_for_a_pool_with_no_node_runs_on_the_live_fallback_and_says_so(
        ledger_service, crew, vhost_url, pools, pools_file, wire):
    a, b, _c, _d = pools
    ledger_service.start("--pools", str(pools_file), "--fallback-check-s", "0.3")
    crew.start(*HEARTBEAT, "--name", "bee", pools=(b,))
    with Client(vhost_url) as client:
        handle = client.submit(JobSpec("true", pool=a))
        updates = list(handle.updates(timeout_s=60))
    # Serial jobs try C first: it has no node, so B it is. One run, one result (no
    # Running reply: /bin/true ends within the node's --running-after; the ledger still
    # records it running, below).
    assert [(u.state, u.attempt) for u in updates] == [(JobState.IDLE, 1), (JobState.EXITED, 1)]
    assert updates[0].reason == f"rerouted from {a} to {b}: no live node in {a} for 2s"
    assert (updates[-1].host, updates[-1].exit_code) == ("bee", 0)
    record = ledger_service.wait_for(
        lambda led: (r := led.job(handle.job_id)) and r.state is LedgerState.EXITED and r)
    assert (record.pool, record.host) == (b, "bee")
    led = ledger_service.ledger()
    try:
        events = [e.event for e in led.history(handle.job_id)]
        assert events == ["job.submitted", REROUTED, "job.claimed", "job.running", "job.exited"]
    finally:
        led.close()
    assert wire.depth(topology.pool_queue(a)) == 0 and wire.depth(topology.pool_queue(b)) == 0
    shown = _cli(vhost_url, ledger_service.db_url, "explain", handle.job_id)
    assert f"rerouted from {a} to {b}: no live node in {a} for 2s" in shown.stdout, shown
    history = _cli(vhost_url, ledger_service.db_url, "history", handle.job_id)
    assert REROUTED in history.stdout, history


def test_a_no_fallback_job_keeps_waiting_and_runs_when_a_node_of_its_pool_starts(
        ledger_service, crew, vhost_url, pools, pools_file, wire):
    a, b, _c, _d = pools
    ledger_service.start("--pools", str(pools_file), "--fallback-check-s", "0.3")
    crew.start(*HEARTBEAT, "--name", "bee", pools=(b,))
    url, db = vhost_url, ledger_service.db_url
    kept = _cli(url, db, "submit", "--no-fallback", "--pool", a, "--", "true")
    moved = _cli(url, db, "submit", "--pool", a, "--", "true")
    assert kept.returncode == 0 and moved.returncode == 0, (kept.stderr, moved.stderr)
    kept_id, moved_id = kept.stdout.strip(), moved.stdout.strip()
    # The job submitted after it has moved: the ledger looked, and left this one be.
    ledger_service.wait_for(lambda led: (r := led.job(moved_id)) and r.pool == b, 30)
    ledger_service.wait_for(lambda led: (r := led.job(kept_id)) and r.state is LedgerState.IDLE)
    assert wire.depth(topology.pool_queue(a)) == 1
    explained = _cli(url, db, "explain", kept_id)
    assert f"no live node serves pool {a}" in explained.stdout, explained
    assert f"NoFallback: it waits for a node of pool {a}" in explained.stdout, explained
    crew.start(*HEARTBEAT, "--name", "ay", pools=(a,))
    record = ledger_service.wait_for(
        lambda led: (r := led.job(kept_id)) and r.state is LedgerState.EXITED and r, 60)
    assert (record.pool, record.host, record.exit_code) == (a, "ay", 0)
    led = ledger_service.ledger()
    try:
        assert _rerouted(led, kept_id) == []
    finally:
        led.close()


def test_with_no_live_fallback_a_job_stays_and_explain_says_so_until_one_starts(
        ledger_service, crew, vhost_url, pools, pools_file, wire):
    """Serial jobs fall back to B (C first, but it has no node), smp to C, mpi to D only."""
    a, b, c, d = pools
    ledger_service.start("--pools", str(pools_file), "--fallback-check-s", "0.3")
    crew.start(*HEARTBEAT, "--name", "bee", pools=(b,))
    with Client(vhost_url) as client:
        smp = client.submit(JobSpec("true", pool=a, resources=Resources(cpus=2)))
        mpi = client.submit(JobSpec("true", pool=a, nodes=Nodes(min=2, max=2)))
        serial = client.submit(JobSpec("true", pool=a))
        assert serial.wait(timeout_s=60).host == "bee"
        assert wire.depth(topology.pool_queue(a)) == 2  # smp and mpi: nowhere to go
        for handle, kind, fallback in ((smp, "smp", c), (mpi, "mpi", d)):
            shown = _cli(vhost_url, ledger_service.db_url, "explain", handle.job_id)
            assert (f"no live fallback for {kind} jobs: {fallback} has no live node either; "
                    f"it stays in {a}") in shown.stdout, shown
        crew.start(*HEARTBEAT, "--name", "sea", pools=(c,))
        result = smp.wait(timeout_s=60)
    assert (result.host, result.exit_code) == ("sea", 0)
    assert wire.depth(topology.pool_queue(a)) == 1  # the mpi job still waits for D
    led = ledger_service.ledger()
    try:
        assert _rerouted(led, serial.job_id) == [f"rerouted from {a} to {b}: no live node in "
                                                 f"{a} for 2s"]
        assert _rerouted(led, smp.job_id)[0].startswith(f"rerouted from {a} to {c}:")
        assert _rerouted(led, mpi.job_id) == []
    finally:
        led.close()


def test_a_job_the_ledger_never_saw_is_rerouted_by_what_its_message_carries(
        ledger_service, crew, vhost_url, pools, pools_file, wire):
    """A foreign producer's message without a message_id (amqp-publish sets none)."""
    a, b, _c, _d = pools
    ledger_service.start("--pools", str(pools_file), "--fallback-check-s", "0.3")
    crew.start(*HEARTBEAT, "--name", "bee", pools=(b,))
    replies = wire.tap("fallback.replies", "r", kind="direct")
    msg = amqp.Message(b"", application_headers={"Cmd": "/bin/echo", "Arguments": "hi"},
                       delivery_mode=2, reply_to="/exchange/fallback.replies/r")
    wire.channel.basic_publish(msg, topology.jobs_exchange(), routing_key=a, mandatory=True)
    states = []
    while not states or states[-1] not in ("Exited", "Rejected"):
        reply = wire.get(replies, timeout_s=60)
        states.append(reply.headers[headers.JOB_STATE])
        job_id = reply.properties["message_id"]
    assert states == ["Idle", "Exited"]  # too short for a Running reply
    assert wire.depth(topology.pool_queue(a)) == 0
    record = ledger_service.wait_for(
        lambda led: (r := led.job(job_id)) and r.state is LedgerState.EXITED and r)
    assert (record.pool, record.host, record.command) == (b, "bee", "/bin/echo")


# -- the pure parts -----------------------------------------------------------------------

def test_the_pools_file_gives_each_pool_its_fallbacks_and_fallback_after():
    policies = parse_pools({"defaults": {"fallback_after": "1m"},
                            "pools": {"a": {"fallbacks": {"mpi": ["b"], "serial": "c"}},
                                      "b": {"fallback_after": 45}}})
    assert policies["a"] == PoolPolicy("a", 60.0, {"mpi": ("b",), "serial": ("c",)})
    assert policies["b"].fallback_after_s == 45.0 and policies["b"].fallbacks_for("mpi") == ()
    assert parse_pools({"pools": {"x": None}})["x"].fallback_after_s == 30.0


@pytest.mark.parametrize(("data", "message"), [
    ([], "pools.yaml: must be a mapping with a 'pools' mapping"),
    ({"pool": {}}, "pools.yaml: pool: unknown field (expected one of defaults, pools)"),
    ({"pools": {}}, "pools.yaml: pools: must be a non-empty mapping of pool names"),
    ({"pools": {"a": {"fallbacks": {"gpu": ["b"]}}}},
     "pools.yaml: pools.a.fallbacks.gpu: unknown job kind (use mpi, serial or smp)"),
    ({"pools": {"a": {"fallbacks": {"mpi": ["a"]}}}},
     "pools.yaml: pools.a.fallbacks.mpi[0]: a pool cannot be its own fallback"),
    ({"pools": {"a": {"fallback_after": "soon"}}},
     "pools.yaml: pools.a.fallback_after: not a duration: 'soon' (use e.g. 1d2h30m, 45m, 90s)"),
    ({"pools": {"a": {"fallback_after": 0}}},
     "pools.yaml: pools.a.fallback_after: must be longer than 0"),
    ({"pools": {"a b": {}}},
     "pools.yaml: pools.a b: invalid pool name 'a b': use letters, digits and _ . : -"),
    ({"pools": {"a": {"fallbacks": {"serial": ["b", "b"]}}}},
     "pools.yaml: pools.a.fallbacks.serial: names a pool twice"),
    ({"pools": {"a": {"wait": 3}}},
     "pools.yaml: pools.a.wait: unknown field (expected one of fallback_after, fallbacks)"),
])
def test_a_bad_pools_file_is_one_line_naming_the_field(data, message):
    with pytest.raises(PoolsFileError) as info:
        parse_pools(data, source="pools.yaml")
    assert str(info.value) == message


def test_the_ledger_refuses_to_start_with_a_bad_pools_file(tmp_path, vhost_url):
    path = tmp_path / "pools.yaml"
    path.write_text("pools: {a: {fallbacks: {gpu: [b]}}}\n", encoding="utf-8")
    done = _cli(vhost_url, f"sqlite:///{tmp_path / 'l.db'}", "ledger", "--pools", str(path))
    assert done.returncode == 2
    assert "pools.a.fallbacks.gpu: unknown job kind (use mpi, serial or smp)" in done.stderr


@pytest.mark.parametrize(("hdrs", "kind"), [
    ({"Cmd": "x"}, "serial"), ({"Cmd": "x", "RequestCpus": 4}, "smp"),
    ({"Cmd": "x", "RequestCpus": "2"}, "smp"), ({"Cmd": "x", "MinNodes": 2}, "mpi"),
    ({"Cmd": "x", "MinNodes": 1, "MaxNodes": "4", "RequestCpus": 8}, "mpi"),
    ({"Cmd": "x", "RequestCpus": "lots"}, "serial"),
])
def test_a_job_s_kind_comes_from_its_nodes_and_cores(hdrs, kind):
    assert job_kind(hdrs) == kind


def test_no_fallback_travels_as_a_header_from_a_job_file():
    spec = spec_from_fields({"command": "true", "fallback": False})
    assert headers.encode_request(spec)[headers.NO_FALLBACK] is True
    assert headers.NO_FALLBACK not in headers.encode_request(spec_from_fields({"command": "t"}))
    decoded = headers.decode_request({"message_id": "j"}, {"Cmd": "t", "NoFallback": "TRUE"})
    assert decoded.spec.fallback is False


def _node(name: str, pools: tuple[str, ...], *, online: bool, ago_s: float,
          draining: bool = False) -> NodeRecord:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    return NodeRecord(name, pools, {}, 2, 2, (), draining, online,
                      now - datetime.timedelta(seconds=ago_s), None, None, 0, interval_s=5.0)


def test_a_pool_falls_back_after_fallback_after_from_its_last_live_moment():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    state = liveness([_node("n1", ("a",), online=False, ago_s=100),
                      _node("n2", ("b",), online=True, ago_s=1),
                      _node("n3", ("c",), online=True, ago_s=1, draining=True)])
    assert state.live == {"b"}
    policy = PoolPolicy("a", 30.0, {"serial": ("c", "b")})
    assert state.first_live(policy, "serial") == "b"  # c drains: not live
    assert state.first_live(policy, "mpi") is None
    # The node was live until 15 s after its last heartbeat (3 intervals): 85 s ago.
    assert state.due_at(policy, now - datetime.timedelta(seconds=200)) == (
        now - datetime.timedelta(seconds=55))
    assert state.due_at(policy, now, watching_since=now) == now + datetime.timedelta(seconds=30)


def test_explain_says_where_and_when_a_waiting_job_will_fall_back(tmp_path):
    t0 = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        save_policies(led, parse_pools({"pools": {"a": {"fallbacks": {"serial": ["c", "b"]}}}}))
        subs = [{**request(job_id, **hdrs), "pool": "a", "at": t0}
                for job_id, hdrs in (("s1", {}), ("k1", {"NoFallback": True}),
                                     ("m1", {"MinNodes": 2}))]
        led.apply_batch([heartbeat("nb", t=(t0 - T0).total_seconds() + 9, pools=("b",))],
                        subs)
        now = t0 + datetime.timedelta(seconds=10)
        notes = {j: explain_notes(led, led.job(j), led.nodes(now), now) for j in
                 ("s1", "k1", "m1")}
    finally:
        led.close()
    assert notes == {
        "s1": ["falls back to pool b (serial job) in 20s: no live node in pool a "
               "(fallback_after 30s)"],
        "k1": ["NoFallback: it waits for a node of pool a"],
        "m1": ["pool a declares no fallback for mpi jobs"]}
