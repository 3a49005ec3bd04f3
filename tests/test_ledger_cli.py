"""dispatch q/ls/history/stat/explain read the ledger (and the broker, for queue depths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ledger_events import heartbeat, job, request

from dispatch import broker, events, topology
from dispatch.events import Event
from dispatch.ledger import Ledger

from conftest import ROOT


def _now(body: dict) -> dict:
    return {**body, "at": events.now()}


@pytest.fixture
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    led = Ledger.open(url)
    big = {"Cpus": 4, "Memory": 8192, "Disk": 100000, "Arch": "X86_64", "OpSys": "LINUX",
           "Machine": "n1", "Groups": "ssd", "Pools": "p"}
    small = {**big, "Cpus": 2, "Memory": 2048, "Machine": "n2", "Groups": ""}
    subs = [{**request(f"idle{i}", owner=o, RequestMemory=m, Requirements=r), "pool": pool,
             "at": events.now()}
            for i, (o, m, r, pool) in enumerate([
                ("alice", 0, "TRUE", "p"), ("alice", 4096, "TRUE", "p"),
                ("bob", 0, 'stringListMember("gpu", Groups) && Memory >= 1024', "p"),
                ("bob", 0, "TRUE", "nobody-serves-this"), ("alice", 99999, "TRUE", "p")])]
    led.apply_batch([], subs)
    for body in (job(Event.CLAIMED, "run1", node="n1"), job(Event.RUNNING, "run1", node="n1"),
                 job(Event.ATTRIBUTE, "run1", node="n1", value="n1:5672"),
                 job(Event.CLAIMED, "done1", node="n2"),
                 job(Event.EXITED, "done1", t=3, node="n2", exit_code=2, duration_s=75.0),
                 job(Event.CLAIMED, "held1", node="n2"),
                 job(Event.HELD, "held1", node="n2", reason="disk quota exceeded")):
        led.apply(body)
    led.apply(_now(heartbeat("n1", machine=big, running=(("run1", 1),))))
    led.apply(_now(heartbeat("n2", machine=small, slots_total=2)))
    led.close()
    return url


def _cli(db: str, *args: str, url: str | None = None,
         queue_type: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISPATCH_LEDGER_URL": db}
    if queue_type:
        env["DISPATCH_QUEUE_TYPE"] = queue_type
    if url:
        env["DISPATCH_BROKER_URL"] = url
    done = subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env, check=False)
    return done


def test_q_lists_unfinished_jobs_and_filters_by_owner_and_state(db):
    out = _cli(db, "q").stdout
    assert "run1" in out and "idle0" in out and "held1" in out and "done1" not in out
    assert "Running" in out and "n1" in out and "4096M" in out
    alice = _cli(db, "ls", "-u", "alice", "--json").stdout
    assert {j["job_id"] for j in json.loads(alice)} == {"idle0", "idle1", "idle4", "run1", "held1"}
    exited = json.loads(_cli(db, "q", "--state", "Exited", "--json").stdout)
    assert [(j["job_id"], j["exit_code"]) for j in exited] == [("done1", 2)]
    bad = _cli(db, "q", "--state", "Sleeping")
    assert bad.returncode == 2 and "--state: unknown state 'Sleeping'" in bad.stderr


def test_q_format_shows_htcondor_attributes_and_chirped_ones(db):
    out = _cli(db, "q", "--state", "Running", "--format", "{JobId} {Owner} {JobStatus} "
               "{RemoteHost} {QpiddEndpoint} {Nonesuch}").stdout
    assert out.strip() == "run1 alice 2 n1 n1:5672 undefined"


def test_history_shows_exit_codes_and_durations_and_one_jobs_changes(db):
    out = _cli(db, "history").stdout
    assert "done1" in out and "0+00:01:15" in out and "run1" not in out
    changes = _cli(db, "history", "done1").stdout
    assert "job.claimed" in changes and "job.exited" in changes and "exit_code=2" in changes
    missing = _cli(db, "history", "nope")
    assert missing.returncode == 2 and "no job nope" in missing.stderr


def test_stat_draws_slots_and_reads_queue_depths_from_the_broker(db, vhost_url):
    with broker.connect(vhost_url) as conn:
        broker.declare_pool(conn.default_channel, "p")
        conn.default_channel.basic_publish(broker.message(b"", {"Cmd": "x"}),
                                           exchange="dispatch.jobs", routing_key="p")
    out = _cli(db, "stat", url=vhost_url).stdout
    assert "[*...] 1/4" in out and "[..] 0/2" in out and "ssd" in out
    pools = json.loads(_cli(db, "stat", "--json", url=vhost_url).stdout)["pools"]
    assert pools == [{"pool": "p", "nodes": 2, "slots": 6, "free": 5, "queued": 1,
                      "consumers": 0}]


def test_stat_counts_the_jobs_waiting_at_every_priority_level_of_a_quorum_pool(db, vhost_url):
    with broker.connect(vhost_url) as conn:
        levels = dict(broker.declare_pool_queues(conn.default_channel, "p", topology.QUORUM))
        confirms = broker.Confirms(conn.default_channel)
        for level in (topology.HIGH, topology.HIGH, topology.LOW):  # in the queues once confirmed
            confirms.wait_for(confirms.publish(broker.message(b"", {"Cmd": "x"}),
                                               topology.jobs_exchange(level), "p"))
        assert conn.default_channel.queue_declare(levels[topology.NORMAL], passive=True)[1] == 0
    pools = json.loads(_cli(db, "stat", "--json", url=vhost_url,
                            queue_type=topology.QUORUM).stdout)["pools"]
    assert [(p["pool"], p["queued"], p["consumers"]) for p in pools] == [("p", 3, 0)]


@pytest.mark.parametrize(("job_id", "expected"), [
    ("idle3", "no live node serves pool nobody-serves-this; no node ever did"),
    ("idle4", "RequestMemory 99999 MiB is larger than any node of pool p (largest: 8192 MiB)"),
    ("idle2", 'no node of pool p satisfies Requirements: stringListMember("gpu", Groups) is '
              'false on every node; closest: n1 fails stringListMember("gpu", Groups)'),
    ("held1", "held: disk quota exceeded; `dispatch release held1` sends it out again"),
    ("idle1", "waiting behind 1 idle job(s) in pool p; 1 node(s) match, 3 slot(s) free"),
    ("run1", "running on n1 (attempt 1)"),
])
def test_explain_says_why_a_job_is_not_running(db, job_id, expected):
    out = _cli(db, "explain", job_id)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout
