"""The flower feed's pure parts: Dispatch events to Celery events, and inspect answers."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest

from dispatch import broker, events, schema, topology
from dispatch.errors import InvalidMessageError
from dispatch.events import Event
from workers.dashboard import nodes as dashboard_nodes
from workers.dashboard.events import Translator, outcome
from workers.dashboard.inspect import Answers
from workers.dashboard.nodes import JobView, NodeBook

NOW = 2_000_000_000.0
NODE = "node-7"


def at(seconds_ago: float = 0.0) -> str:
    moment = datetime.datetime.fromtimestamp(NOW - seconds_ago, datetime.UTC)
    return moment.isoformat(timespec="microseconds")


def checked(body: dict[str, Any]) -> dict[str, Any]:
    """Return ``body`` once it passed the event schema: tests feed only real shapes."""
    schema.validate(schema.EVENT, body, InvalidMessageError)
    return body


def beat(*, ago: float = 0.0, running: tuple[str, ...] = (), slots_free: int = 2,
         jobs_done: int = 4, interval_s: float = 5.0) -> dict[str, Any]:
    body = events.node_event(
        Event.HEARTBEAT, node=NODE, pools=["default", "gpu"],
        machine={"Machine": NODE, "OpSys": "LINUX", "Cpus": 4}, slots_total=4,
        slots_free=slots_free, memory_free_mb=1024,
        running=[{"job_id": j, "attempt": 1, "started_at": at(ago)} for j in running],
        waiting=0, draining=False, jobs_done=jobs_done, last_job_at=None, started_at=at(600),
        interval_s=interval_s, lease_s=3 * interval_s)
    body["at"] = at(ago)
    return checked(body)


def job(event: Event, job_id: str = "j-1", **fields: Any) -> dict[str, Any]:
    body = events.job_event(event, job_id=job_id, attempt=fields.pop("attempt", 1),
                            pool="default", node=NODE, **fields)
    body["at"] = at()
    return checked(body)


def claim(job_id: str = "j-1", headers: dict[str, Any] | None = None,
          attempt: int = 1) -> dict[str, Any]:
    request = {"properties": {"message_id": job_id, "user_id": "alice"},
               "headers": headers or {"Cmd": "/bin/echo", "Arguments": ["hi", "there"]},
               "body": b"", "exchange": topology.jobs_exchange(), "routing_key": "default"}
    return job(Event.CLAIMED, job_id, host=NODE, lease_s=15.0, request=request,
               attempt=attempt)


def exited(job_id: str = "j-1", code: int | None = 0, signal: int | None = None,
           ) -> dict[str, Any]:
    return job(Event.EXITED, job_id, host=NODE, exit_code=code,
               exit_by_signal=signal is not None, exit_signal=signal, duration_s=1.25,
               result_bytes=300)


def test_a_nodes_first_fresh_heartbeat_brings_it_online_with_its_counts() -> None:
    t = Translator(version="1.2")
    first = t.translate(beat(running=("a", "b"), slots_free=1, jobs_done=7), NOW)
    assert [(e.hostname, e.type) for e in first] == [
        ("celery@node-7", "worker-online"), ("celery@node-7", "worker-heartbeat")]
    fields = first[1].fields
    assert fields["freq"] == 5.0 and fields["active"] == 2 and fields["processed"] == 7
    assert fields["loadavg"] == [3.0, 3.0, 3.0]  # busy slots
    assert fields["sw_ident"] == "dispatch" and fields["sw_ver"] == "1.2"
    assert fields["sw_sys"] == "LINUX"
    again = t.translate(beat(), NOW)
    assert [e.type for e in again] == ["worker-heartbeat"]


def test_the_load_average_follows_busy_slots_slowly() -> None:
    t = Translator()
    t.translate(beat(ago=60, slots_free=4), NOW - 60)
    t.translate(beat(slots_free=0), NOW)
    one, five, fifteen = t.book.node(NODE).load
    assert 0 < fifteen < five < one < 4


def test_a_stale_heartbeat_from_a_backlog_does_not_bring_a_node_online() -> None:
    t = Translator()
    assert t.translate(beat(ago=600), NOW) == []
    assert list(t.book.alive()) == []


def test_a_node_whose_heartbeats_stop_goes_offline_after_three_intervals() -> None:
    t = Translator()
    t.translate(beat(interval_s=5.0), NOW)
    assert t.expire(NOW + 14) == []
    gone = t.expire(NOW + 16)
    assert [(e.hostname, e.type) for e in gone] == [("celery@node-7", "worker-offline")]
    assert t.expire(NOW + 30) == []


def test_node_offline_becomes_worker_offline() -> None:
    t = Translator()
    t.translate(beat(), NOW)
    found = t.translate(checked(events.node_event(Event.OFFLINE, node=NODE,
                                                  reason="drained")), NOW)
    assert [e.type for e in found] == ["worker-offline"]
    assert list(t.book.alive()) == []


def test_a_claim_is_received_with_the_command_as_name_and_its_arguments() -> None:
    [event] = Translator().translate(claim(attempt=2), NOW)
    assert event.type == "task-received" and event.hostname == "celery@node-7"
    f = event.fields
    assert f["uuid"] == "j-1" and f["name"] == "/bin/echo"
    assert f["args"] == "['hi', 'there']"
    assert f["kwargs"] == "{'pool': 'default', 'owner': 'alice'}"
    assert f["retries"] == 1 and f["routing_key"] == "default"
    assert f["exchange"] == topology.jobs_exchange()
    assert f["timestamp"] == pytest.approx(NOW)


def test_a_job_name_wins_and_classad_quoted_headers_are_read_plainly() -> None:
    headers = {"Cmd": '"/usr/bin/python3"', "Arguments": '"analyse.py --in \'a b\'"',
               "JobName": '"nightly"'}
    [event] = Translator().translate(claim(headers=headers), NOW)
    assert event.fields["name"] == "nightly"
    assert event.fields["args"] == "['analyse.py', '--in', 'a b']"
    assert "'cmd': '/usr/bin/python3'" in event.fields["kwargs"]


def test_exit_zero_succeeds_with_its_runtime_and_is_counted_on_the_node() -> None:
    t = Translator()
    t.translate(claim(), NOW)
    [event] = t.translate(exited(), NOW)
    assert event.type == "task-succeeded"
    assert event.fields["runtime"] == 1.25
    assert event.fields["result"] == "exit code 0, 300 bytes of results"
    assert t.book.node(NODE).totals == {"/bin/echo": 1}
    assert t.book.job("j-1") is None


@pytest.mark.parametrize(("code", "signal", "words"), [
    (3, None, "exit code 3"), (None, 9, "killed by signal 9 (SIGKILL)")])
def test_a_non_zero_exit_or_a_signal_fails_the_task(code: int | None, signal: int | None,
                                                    words: str) -> None:
    [event] = Translator().translate(exited(code=code, signal=signal), NOW)
    assert event.type == "task-failed"
    assert event.fields["exception"] == words and event.fields["runtime"] == 1.25
    assert outcome({"exit_by_signal": True, "exit_signal": 999}) == "killed by signal 999"


def test_a_running_job_starts_no_earlier_than_it_was_received() -> None:
    t = Translator()
    t.translate(claim(), NOW)
    [event] = t.translate(job(Event.RUNNING, host=NODE, started_at=at(0.001)), NOW)
    assert event.type == "task-started"
    assert event.fields["timestamp"] == pytest.approx(NOW)


def test_a_claim_made_as_the_job_starts_is_received_then_started() -> None:
    body = claim()
    body["started_at"] = at(0.001)
    received, started = Translator().translate(body, NOW)
    assert (received.type, started.type) == ("task-received", "task-started")
    assert received.fields["uuid"] == started.fields["uuid"] == body["job_id"]
    assert started.fields["timestamp"] >= received.fields["timestamp"]


def test_removed_and_held_jobs_are_revoked_with_their_reason() -> None:
    t = Translator()
    t.translate(claim("run"), NOW)
    t.translate(job(Event.RUNNING, "run", host=NODE, started_at=at()), NOW)
    [removed] = t.translate(job(Event.REMOVED, "run", host=NODE, reason="not needed",
                                by="alice", duration_s=2.0), NOW)
    assert removed.type == "task-revoked"
    assert removed.fields["terminated"] is True and removed.fields["runtime"] == 2.0
    assert removed.fields["exception"] == "removed by alice: not needed"
    [held] = t.translate(job(Event.HELD, "queued", host=NODE, reason="data not ready"), NOW)
    assert held.fields["terminated"] is False
    assert held.fields["exception"] == "held: data not ready"
    assert list(t.book.node(NODE).revoked) == ["run", "queued"]


def test_a_rejected_job_is_rejected_with_its_name() -> None:
    request = {"properties": {}, "headers": {"Cmd": "frobnicate"}, "body": b""}
    [event] = Translator().translate(job(Event.REJECTED, host=NODE, reason="Cmd: not found",
                                         request=request), NOW)
    assert event.type == "task-rejected" and event.fields["name"] == "frobnicate"
    assert event.fields["exception"] == "rejected: Cmd: not found"


def test_attribute_events_show_nothing() -> None:
    assert Translator().translate(job(Event.ATTRIBUTE, name="Progress", value="3"), NOW) == []


def test_tracked_jobs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard_nodes, "MAX_TRACKED_JOBS", 3)
    book = NodeBook()
    for i in range(5):
        book.track(JobView(f"j{i}", "n", "[]", "{}", "default", 1, NODE))
    assert list(book.jobs) == ["j2", "j3", "j4"]


def answers_for(*running: str) -> Answers:
    t = Translator()
    for job_id in running:
        t.translate(claim(job_id), NOW)
    t.translate(beat(running=running, slots_free=4 - len(running)), NOW)
    return Answers(t.book, {"hostname": "mq", "port": 5672, "userid": "feed"})


def test_active_queues_have_celerys_queue_shape_for_each_pool() -> None:
    queues = answers_for().active_queues(NODE)
    assert [q["name"] for q in queues] == [topology.pool_queue("default"),
                                           topology.pool_queue("gpu")]
    assert queues[0]["exchange"]["name"] == topology.jobs_exchange()
    assert queues[0]["queue_arguments"] == topology.pool_queue_arguments()
    assert {"alias", "bindings", "no_ack", "exclusive", "auto_delete"} <= set(queues[0])


def test_active_queues_of_a_quorum_pool_name_each_level_queue_as_the_broker_has_it(
        vhost_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_QUEUE_TYPE", topology.QUORUM)
    queues = answers_for().active_queues(NODE)
    assert [q["name"] for q in queues] == [
        *topology.pool_queue_names("default", topology.QUORUM),
        *topology.pool_queue_names("gpu", topology.QUORUM)]
    with broker.connect(vhost_url, heartbeat_s=0) as conn:
        channel = conn.default_channel
        levels = broker.declare_pool_queues(channel, "default", topology.QUORUM)
        confirms = broker.Confirms(channel)
        for level in (topology.HIGH, topology.LOW):
            confirms.wait_for(confirms.publish(broker.message(b"", {"Cmd": "x"}),
                                               topology.jobs_exchange(level), "default"))

        def depth() -> int:
            total = 0
            for queue, (level, _) in zip(queues[:3], levels, strict=True):
                assert queue["exchange"]["name"] == topology.jobs_exchange(level)
                # Declared as Flower is told it is: the broker refuses (406) other arguments.
                total += channel.queue_declare(queue["name"], durable=queue["durable"],
                                               auto_delete=queue["auto_delete"],
                                               arguments=queue["queue_arguments"])[1]
            return total

        # Confirmed, both are in; a quorum queue's count may take a moment to say so.
        deadline = time.monotonic() + 10
        while (found := depth()) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert found == 2


def test_stats_active_and_registered_come_from_the_heartbeat_and_claims() -> None:
    answers = answers_for("r-1")
    stats = answers.stats(NODE)
    assert stats["pool"]["max-concurrency"] == 4 and stats["pool"]["free-slots"] == 3
    assert stats["broker"] == {"hostname": "mq", "port": 5672, "userid": "feed"}
    assert stats["dispatch"]["jobs_done"] == 4
    [active] = answers.active(NODE)
    assert active["id"] == "r-1" and active["name"] == "/bin/echo"
    assert active["hostname"] == "celery@node-7"
    assert answers.registered(NODE) == ["/bin/echo"]
    assert answers.conf(NODE)["machine_Cpus"] == 4
    assert answers.ping(NODE) == {"ok": "pong"}


def test_celery_commands_that_act_on_workers_are_refused_with_dispatchs_way() -> None:
    handlers = answers_for().handlers()
    refused = handlers["pool_shrink"](NODE, n=1)
    assert "dispatch rm" in refused["error"]
    assert handlers["enable_events"](NODE) is None


def test_nodes_gone_for_a_day_are_forgotten() -> None:
    t = Translator()
    t.translate(beat(), NOW)
    t.translate(checked(events.node_event(Event.OFFLINE, node=NODE, reason="drained")), NOW)
    t.expire(NOW + 3600)
    assert NODE in t.book.nodes
    t.expire(NOW + dashboard_nodes.FORGET_AFTER_S + 1)
    assert NODE not in t.book.nodes
