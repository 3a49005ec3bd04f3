"""The ledger store on SQLite and on a real PostgreSQL: events in, jobs and nodes out."""

from __future__ import annotations

import datetime

import pytest
from ledger_events import T0, at, heartbeat, job, request
from sqlalchemy import event, insert, text

from dispatch.errors import InvalidMessageError
from dispatch.events import Event
from dispatch.ledger import Ledger, LedgerState
from dispatch.ledger.models import AttributeRow, JobRow
from dispatch.ledger.store import default_url


@pytest.fixture
def ledger(ledger_url: str):
    led = Ledger.open(ledger_url)
    yield led
    led.close()


def test_a_job_goes_from_claim_to_exit_with_every_step_in_its_history(ledger):
    for body in (job(Event.CLAIMED, "j1", t=0), job(Event.RUNNING, "j1", t=1),
                 job(Event.ATTRIBUTE, "j1", t=2), job(Event.EXITED, "j1", t=3, exit_code=7)):
        assert ledger.apply(body)
    rec = ledger.job("j1")
    assert rec.state is LedgerState.EXITED
    assert (rec.owner, rec.host, rec.exit_code, rec.result_bytes) == ("alice", "n1", 7, 123)
    assert rec.command == "/bin/sleep" and rec.arguments == ("30",)
    assert rec.attributes == {"QpiddEndpoint": "h:1"}
    assert rec.started_at == T0 + datetime.timedelta(seconds=1)
    assert [h.event for h in ledger.history("j1")] == ["job.claimed", "job.running",
                                                       "job.exited"]


def test_a_claim_made_as_the_job_starts_is_also_its_running_event(ledger):
    claim = job(Event.CLAIMED, "j1", t=0, started_at=at(0.5))
    assert ledger.apply(claim)
    rec = ledger.job("j1")
    assert rec.state is LedgerState.RUNNING
    assert rec.started_at == T0 + datetime.timedelta(seconds=0.5)
    assert [h.event for h in ledger.history("j1")] == ["job.claimed", "job.running"]
    # Applied once: the claim again, or a running event of the same attempt, changes nothing.
    assert not ledger.apply(claim)
    assert not ledger.apply(job(Event.RUNNING, "j1", t=1))
    assert ledger.apply(job(Event.EXITED, "j1", t=2))
    assert [h.event for h in ledger.history("j1")] == ["job.claimed", "job.running",
                                                       "job.exited"]


def test_redelivered_events_are_applied_once(ledger):
    claim, exited = job(Event.CLAIMED, "j1"), job(Event.EXITED, "j1", t=2)
    assert ledger.apply(claim) and ledger.apply(exited)
    assert not ledger.apply(claim)
    assert not ledger.apply(exited)
    result = ledger.apply_batch([exited, exited, claim])
    assert result.applied == [False, False, False]
    assert len(ledger.history("j1")) == 2
    assert ledger.job("j1").state is LedgerState.EXITED


def test_a_batch_that_holds_the_same_event_twice_applies_it_once(ledger):
    claim = job(Event.CLAIMED, "j1")
    assert ledger.apply_batch([claim, claim]).applied == [True, False]


def test_events_of_a_stale_attempt_change_nothing(ledger):
    ledger.apply(job(Event.CLAIMED, "j1", 1, t=0))
    ledger.apply(job(Event.REQUEUED, "j1", 2, t=40, node="ledger", reason="lease expired"))
    ledger.apply(job(Event.CLAIMED, "j1", 2, t=41, node="n2"))
    assert not ledger.apply(job(Event.EXITED, "j1", 1, t=50, exit_code=1))
    assert ledger.job("j1").state is LedgerState.CLAIMED
    assert ledger.apply(job(Event.EXITED, "j1", 2, t=60, node="n2", exit_code=0))
    rec = ledger.job("j1")
    assert (rec.state, rec.attempt, rec.exit_code, rec.host) == (LedgerState.EXITED, 2, 0, "n2")


def test_a_final_state_is_never_replaced(ledger):
    ledger.apply(job(Event.CLAIMED, "j1"))
    ledger.apply(job(Event.EXITED, "j1", t=1))
    assert not ledger.apply(job(Event.REMOVED, "j1", t=2))
    assert ledger.job("j1").state is LedgerState.EXITED


def test_heartbeats_describe_nodes_and_an_offline_node_is_not_online(ledger):
    assert ledger.apply(heartbeat("n1", t=0, running=(("j1", 1),)))
    assert not ledger.apply(heartbeat("n1", t=0))  # the same one again
    (node,) = ledger.nodes(now=T0 + datetime.timedelta(seconds=1))
    assert node.online and node.running == ("j1",) and node.pools == ("p",)
    assert node.slots_total == 4 and node.slots_free == 3
    assert node.machine["Memory"] == 8192
    assert node.last_heartbeat_at == T0 and node.last_heartbeat_at.tzinfo is not None
    (late,) = ledger.nodes(now=T0 + datetime.timedelta(seconds=16))
    assert not late.online
    ledger.apply({"event": "node.offline", "at": at(2), "node": "n1", "reason": "drained"})
    (gone,) = ledger.nodes(now=T0 + datetime.timedelta(seconds=3))
    assert not gone.online and gone.offline_reason == "drained"


def test_a_heartbeat_listing_a_job_renews_its_lease(ledger):
    ledger.apply(job(Event.CLAIMED, "j1", t=0))
    ledger.apply(heartbeat("n1", t=20, running=(("j1", 1),)))
    with ledger.transaction() as session:
        assert session.get(JobRow, "j1").lease_renewed_at == T0 + datetime.timedelta(seconds=20)


def test_submissions_are_recorded_idle_with_owner_and_priority(ledger):
    sub = {**request("j9", owner="bob", RequestMemory=512, ArrayId="a1", ArrayIndex=3),
           "pool": "p", "at": T0}
    result = ledger.apply_batch([], [sub, sub])
    assert result.applied == []
    rec = ledger.job("j9")
    assert (rec.state, rec.owner, rec.priority, rec.memory_mb) == (LedgerState.IDLE, "bob", 4, 512)
    assert (rec.array_id, rec.array_index, rec.submitted_at) == ("a1", 3, T0)
    assert [j.job_id for j in ledger.jobs(owner="bob", states=[LedgerState.IDLE])] == ["j9"]


def test_a_claim_for_a_removed_job_asks_for_the_remove_to_be_sent_again(ledger):
    ledger.apply_batch([], [{**request("j1"), "pool": "p", "at": T0}])
    with ledger.transaction() as session:
        row = session.get(JobRow, "j1")
        row.state, row.control_op, row.control_by = "Removed", "remove", "alice"
    result = ledger.apply_batch([job(Event.CLAIMED, "j1", t=5)])
    assert result.applied == [False]
    assert [(r.op, r.job_id) for r in result.effects.rebroadcasts] == [("remove", "j1")]
    assert ledger.job("j1").state is LedgerState.REMOVED


@pytest.mark.parametrize(("body", "field"), [
    ({"event": "job.exited", "at": at(0), "node": "n1"}, "job_id"),
    ({"event": "node.bogus", "at": at(0), "node": "n1"}, "event"),
    ({"event": "node.offline", "at": "yesterday", "node": "n1"}, "at"),
])
def test_a_malformed_event_is_refused_naming_the_field(ledger, body, field):
    with pytest.raises(InvalidMessageError) as info:
        ledger.apply(body)
    assert field in info.value.reason


def test_the_default_ledger_is_a_sqlite_file_in_the_data_dir(tmp_path):
    assert default_url({"DISPATCH_DATA_DIR": str(tmp_path)}) == f"sqlite:///{tmp_path}/ledger.db"
    assert default_url({"DISPATCH_LEDGER_URL": "postgresql+psycopg://x/y"}).startswith("postgres")


def test_a_second_nodes_claim_of_the_same_attempt_moves_the_job_and_its_lease(ledger):
    # The first node died before acking: the broker gave the same message to another node.
    assert ledger.apply(job(Event.CLAIMED, "j1", t=0, node="n1"))
    assert ledger.apply(job(Event.CLAIMED, "j1", t=5, node="n2"))
    assert not ledger.apply(job(Event.CLAIMED, "j1", t=5, node="n2"))
    assert ledger.apply(heartbeat("n2", t=30, running=(("j1", 1),)))
    assert ledger.job("j1").host == "n2"
    with ledger.transaction() as session:
        assert session.get(JobRow, "j1").lease_renewed_at == T0 + datetime.timedelta(seconds=30)


def test_a_purge_forgets_jobs_finished_before_the_horizon_and_keeps_the_rest(ledger):
    # old1/old2 finished before T0+100 s; new after it; held never finished.
    for job_id, t in (("old1", 10), ("old2", 20), ("new", 200)):
        ledger.apply(job(Event.CLAIMED, job_id, t=t - 5))
        ledger.apply(job(Event.ATTRIBUTE, job_id, t=t - 4))
        ledger.apply(job(Event.EXITED, job_id, t=t))
    ledger.apply(job(Event.CLAIMED, "held", t=0))
    ledger.apply(job(Event.HELD, "held", t=1))
    horizon = T0 + datetime.timedelta(seconds=100)

    assert ledger.purge(horizon, batch=1) == 2  # one job per transaction: the loop goes on
    assert ledger.job("old1") is None and ledger.job("old2") is None
    assert ledger.history("old1") == [] and ledger.history("old2") == []
    assert ledger.job("new").attributes == {"QpiddEndpoint": "h:1"}
    assert len(ledger.history("new")) == 2
    assert ledger.job("held").state is LedgerState.HELD
    assert {j.job_id for j in ledger.jobs()} == {"new", "held"}
    assert ledger.purge(horizon) == 0  # nothing left to forget
    with ledger.transaction() as session:  # no attribute row of a purged job is left over
        assert {r.job_id for r in session.query(AttributeRow)} == {"new"}


def test_a_late_event_of_a_purged_job_does_not_bring_it_back(ledger):
    ledger.apply(job(Event.CLAIMED, "j1", t=0))
    ledger.apply(job(Event.EXITED, "j1", t=1))
    assert ledger.purge(T0 + datetime.timedelta(seconds=100)) == 1
    # A redelivered event from before the horizon is ignored ...
    assert not ledger.apply(job(Event.EXITED, "j1", t=1))
    assert ledger.job("j1") is None
    # ... while a job first heard of after the horizon is recorded as usual.
    assert ledger.apply(job(Event.CLAIMED, "j2", t=150))
    assert ledger.job("j2").state is LedgerState.CLAIMED


def test_an_exited_job_keeps_the_reason_its_node_gave(ledger):
    assert ledger.apply(job(Event.CLAIMED, "oom", t=0))
    reason = "exceeded RequestMemory (64 MiB): killed by the out-of-memory killer"
    assert ledger.apply(job(Event.EXITED, "oom", t=1, exit_code=None, exit_by_signal=True,
                            exit_signal=9, reason=reason))
    assert ledger.job("oom").reason == reason
    assert ledger.apply(job(Event.CLAIMED, "fine", t=0))
    assert ledger.apply(job(Event.EXITED, "fine", t=1))
    assert ledger.job("fine").reason is None


def test_a_gathering_event_keeps_the_heads_node_count_and_status_as_attributes(tmp_path):
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        assert led.apply(job(Event.CLAIMED, "g1"))
        assert led.apply(job(Event.GATHERING, "g1", t=1, held=1, status="holds 1 of 2"))
        assert led.apply(job(Event.GATHERING, "g1", t=2, held=2, status="holds 2 of 2"))
        attrs = led.job("g1").attributes
        assert attrs["NodesHeld"] == "2" and attrs["GangStatus"] == "holds 2 of 2"
    finally:
        led.close()


def test_the_queue_is_read_through_the_state_index_not_by_scanning_finished_jobs(ledger):
    # A ledger that has run a while: finished jobs outnumber the waiting ones by far.
    rows = [{"job_id": f"done{i:05d}", "pool": "p", "state": "Exited",
             "submitted_at": T0, "finished_at": T0} for i in range(3000)]
    rows += [{"job_id": "run", "pool": "p", "state": "Running",
              "submitted_at": T0 + datetime.timedelta(seconds=2), "finished_at": None},
             {"job_id": "wait", "pool": "p", "state": "Idle",
              "submitted_at": T0 + datetime.timedelta(seconds=1), "finished_at": None}]
    with ledger.engine.begin() as conn:
        conn.execute(insert(JobRow), rows)
    if ledger.engine.dialect.name == "postgresql":
        with ledger.engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))  # as autovacuum does
    seen: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, params, *_):
        seen.append((statement, params))

    event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        assert [j.job_id for j in ledger.jobs(finished=False)] == ["wait", "run"]
    finally:
        event.remove(ledger.engine, "before_cursor_execute", capture)
    statement, params = next((s, p) for s, p in seen if "FROM jobs" in s)
    explain = ("EXPLAIN " if ledger.engine.dialect.name == "postgresql"
               else "EXPLAIN QUERY PLAN ")
    raw = ledger.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(explain + statement, params)
        plan = " ".join(str(row) for row in cursor.fetchall())
    finally:
        raw.close()
    assert "ix_jobs_state" in plan, plan
