"""The real ``dispatch ledger`` process against the test broker, fed by real published events."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import amqp
import pytest
from fixtures_ledger import LedgerProcess
from ledger_events import heartbeat, job, request

from dispatch import events, headers, topology
from dispatch.events import Event
from dispatch.ledger import Ledger, LedgerState


def _job_message(job_id: str, *, reply_to: str | None = None, **hdrs: object) -> amqp.Message:
    props: dict[str, object] = {"message_id": job_id, "correlation_id": job_id, "priority": 6,
                                "user_id": "guest", "delivery_mode": 2}
    if reply_to:
        props["reply_to"] = reply_to
    return amqp.Message(b"", application_headers={"Cmd": "/bin/true", **hdrs}, **props)


def test_published_events_reach_the_ledger_once_even_when_sent_twice(ledger_service, wire):
    ledger_service.start()
    claim = job(Event.CLAIMED, "j1", t=0)
    for body in (claim, claim, job(Event.RUNNING, "j1", t=1), job(Event.EXITED, "j1", t=2),
                 job(Event.EXITED, "j1", t=2)):
        wire.publish_event(body)
    rec = ledger_service.wait_for(
        lambda led: (r := led.job("j1")) and r.state is LedgerState.EXITED and r)
    assert rec.exit_code == 0 and rec.host == "n1"
    led = ledger_service.ledger()
    try:
        assert [h.event for h in led.history("j1")] == ["job.claimed", "job.running",
                                                        "job.exited"]
    finally:
        led.close()


def test_a_submitted_job_is_recorded_idle_and_stays_in_its_pool_queue(ledger_service, wire,
                                                                      pool):
    ledger_service.start("--pool", pool)
    wire.channel.basic_publish(_job_message("s1", RequestCpus=2), topology.jobs_exchange(),
                               routing_key=pool, mandatory=True)
    rec = ledger_service.wait_for(lambda led: led.job("s1"))
    assert (rec.state, rec.owner, rec.priority, rec.cpus) == (LedgerState.IDLE, "guest", 6, 2)
    assert rec.submitted_at is not None
    assert wire.depth(topology.pool_queue(pool)) == 1


def test_pools_named_in_heartbeats_get_a_queue_and_their_submissions_are_seen(ledger_service,
                                                                             wire, pool):
    ledger_service.start()
    wire.publish_event(heartbeat("n7", pools=(pool,)))
    ledger_service.wait_for(lambda led: led.nodes())

    def bound() -> bool:
        try:
            wire.channel.basic_publish(_job_message("h1"), topology.jobs_exchange(),
                                       routing_key=pool, mandatory=True)
        except amqp.exceptions.AMQPError:
            return False
        return True

    # The ledger logs "tracking pool" once both the pool queue and its copy binding exist;
    # a job published between the two would reach the pool but not the ledger.
    ledger_service.wait_for(lambda _led: f"tracking pool {pool}" in ledger_service.log())
    assert wire.depth(topology.pool_queue(pool)) >= 0
    assert bound()
    rec = ledger_service.wait_for(lambda led: led.job("h1"))
    assert rec.pool == pool and rec.state is LedgerState.IDLE


def test_a_malformed_event_is_dead_lettered_and_the_ledger_keeps_going(ledger_service, wire):
    ledger_service.start()
    dead = topology.dead_letter_queue()
    wire.publish_event({"event": "job.claimed", "pool": "p", "node": "x", "job_id": "b"},
                       raw=b"\xc1 not msgpack")
    wire.publish_event({"event": "job.exited", "at": "2030-01-01T00:00:00+00:00", "node": "x",
                        "job_id": "b", "attempt": 1, "pool": "p"})  # no host, exit code...
    wire.publish_event(job(Event.CLAIMED, "after"))
    ledger_service.wait_for(lambda led: led.job("after"))
    assert wire.depth(dead) == 2
    assert ledger_service.proc.poll() is None
    assert "dead-lettering" in ledger_service.log()


def test_an_expired_lease_sends_the_job_out_again_then_holds_it_after_max_attempts(
        ledger_service, wire, pool):
    ledger_service.start("--pool", pool)
    replies = wire.tap("amq.direct", "replies-" + pool, kind="direct")
    req = request("L1", reply_to=f"/exchange/amq.direct/replies-{pool}", MaxAttempts=2)
    now = events.now()
    claim = {**job(Event.CLAIMED, "L1", pool=pool, lease_s=0.5, request=req), "at": now}
    wire.publish_event(claim)
    again = wire.get(topology.pool_queue(pool))
    assert again.headers[headers.ATTEMPT] == 2
    assert again.properties["message_id"] == "L1" and "user_id" not in again.properties
    idle = wire.get(replies)
    assert (idle.headers["JobState"], idle.headers["JobStatus"], idle.headers["Attempt"]) == (
        "Idle", 1, 2)
    assert idle.headers["Reason"] == "lease expired on n1"
    # A late exit of attempt 1 is stale; the second claim expires too: MaxAttempts is 2.
    wire.publish_event({**job(Event.EXITED, "L1", 1, pool=pool), "at": events.now()})
    wire.publish_event({**job(Event.CLAIMED, "L1", 2, pool=pool, lease_s=0.5, request=req,
                              node="n2"), "at": events.now()})
    held = wire.get(replies)
    assert (held.headers["JobState"], held.headers["JobStatus"]) == ("Held", 5)
    assert "lease expired on n2 after 2 attempt(s)" in held.headers["HoldReason"]
    rec = ledger_service.wait_for(
        lambda led: (r := led.job("L1")) and r.state is LedgerState.HELD and r)
    assert rec.attempt == 2 and rec.exit_code is None
    assert wire.depth(topology.pool_queue(pool)) == 0


def test_a_heartbeat_listing_the_job_keeps_its_lease_alive(ledger_service, wire, pool):
    ledger_service.start("--pool", pool)
    now = events.now()
    wire.publish_event({**job(Event.CLAIMED, "K1", pool=pool, lease_s=2.0), "at": now})
    for _ in range(8):
        wire.publish_event({**heartbeat("n1", pools=(pool,), running=(("K1", 1),),
                                        interval_s=0.3), "at": events.now()})
        time.sleep(0.3)
    led = ledger_service.ledger()
    try:
        assert led.job("K1").state is LedgerState.CLAIMED
    finally:
        led.close()
    assert wire.depth(topology.pool_queue(pool)) == 0


def test_the_service_keeps_its_ledger_in_postgresql_too(vhost_url, postgresql_url, tmp_path,
                                                         wire, pool):
    service = LedgerProcess(vhost_url, postgresql_url, tmp_path / "pg-ledger.log")
    try:
        service.start("--pool", pool)
        wire.channel.basic_publish(_job_message("pg1"), topology.jobs_exchange(),
                                   routing_key=pool, mandatory=True)
        service.wait_for(lambda led: led.job("pg1"))
        wire.publish_event(job(Event.CLAIMED, "pg1", pool=pool))
        wire.publish_event(job(Event.EXITED, "pg1", t=1, pool=pool, exit_code=4))
        rec = service.wait_for(
            lambda led: (r := led.job("pg1")) and r.state is LedgerState.EXITED and r)
        assert (rec.owner, rec.exit_code, rec.priority) == ("guest", 4, 6)
    finally:
        service.stop()


def test_the_service_forgets_jobs_finished_longer_ago_than_keep(vhost_url, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    now = datetime.datetime.now(datetime.UTC)
    led = Ledger.open(db_url)
    try:
        for job_id, days_ago in (("old", 40), ("recent", 1)):
            for step, event in enumerate((Event.CLAIMED, Event.EXITED)):
                body = job(event, job_id)
                body["at"] = (now - datetime.timedelta(days=days_ago, seconds=-step)).isoformat()
                assert led.apply(body)
        led.apply(job(Event.CLAIMED, "running"))  # never finished: kept however old
    finally:
        led.close()
    service = LedgerProcess(vhost_url, db_url, tmp_path / "ledger.log").start("--keep", "30d")
    try:
        service.wait_for(lambda ledger: ledger.job("old") is None)
        kept = service.ledger()
        try:
            assert {j.job_id for j in kept.jobs()} == {"recent", "running"}
            assert kept.history("old") == [] and len(kept.history("recent")) == 2
        finally:
            kept.close()
        assert "forgot 1 job(s) finished more than 30+00:00:00 ago" in service.log()
    finally:
        service.stop()


@pytest.mark.parametrize(("keep", "says"), [("0", "must be longer than 0"),
                                            ("soon", "not a duration")])
def test_a_bad_keep_is_a_one_line_error_naming_the_option(keep, says, tmp_path):
    run = subprocess.run([sys.executable, "-m", "dispatch", "ledger", "--db",
                          f"sqlite:///{tmp_path / 'l.db'}", "--keep", keep],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert "--keep" in run.stderr and says in run.stderr
    assert not (tmp_path / "l.db").exists()  # refused before anything was opened
