"""Nodes obey remove, hold and drain orders from trusted senders, and publish what happens."""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu
import pytest

from dispatch import events, topology
from dispatch.events import ControlOp
from dispatch.job import JobSpec, JobState

from amqp_helpers import dead_letter_of, headers_of, publish_job
from conftest import ROOT

pytestmark = pytest.mark.timeout(90)


def send_order(conn: kombu.Connection, op: ControlOp, job_ids: tuple[str, ...] = (), *,
               node: str | None = None, user_id: str | None = "guest",
               attempts: dict[str, int] | None = None) -> str:
    """Publish a control message as the ledger would; return its message id."""
    body: dict[str, Any] = {"op": op.value, "job_ids": list(job_ids), "reason": "test says so",
                            "by": "alice", "at": events.now()}
    if attempts is not None:
        body["attempts"] = attempts
    props: dict[str, Any] = {"content_type": events.CONTENT_TYPE, "delivery_mode": 2,
                             "message_id": uuid.uuid4().hex}
    if user_id:
        props["user_id"] = user_id
    channel = conn.channel()
    try:
        channel.basic_publish(amqp.Message(events.encode(body), **props),
                              exchange=topology.control_exchange(),
                              routing_key=events.control_key(op, node))
    finally:
        channel.close()
    return str(props["message_id"])


class EventTap:
    """Stands in for a ledger: the ledger's queue, bound to every event, read by the test.

    Nodes claim jobs only when the ledger's queue exists (claims go to it directly);
    the queue is deleted afterwards so later tests see a world without a ledger.
    """

    def __init__(self, conn: kombu.Connection) -> None:
        self.channel = conn.channel()
        self.channel.exchange_declare(topology.events_exchange(), "topic", durable=True,
                                      auto_delete=False)
        self.queue = topology.ledger_queue()
        self.channel.queue_declare(self.queue, durable=True, auto_delete=False,
                                   arguments=topology.ledger_queue_arguments())
        self.channel.queue_purge(self.queue)
        self.channel.queue_bind(self.queue, topology.events_exchange(), routing_key="#")
        self.seen: list[dict[str, Any]] = []

    def close(self) -> None:
        """Remove the stand-in ledger queue."""
        self.channel.queue_delete(self.queue)
        self.channel.close()

    def wait_for(self, match: Callable[[dict[str, Any]], bool],
                 timeout_s: float = 30.0) -> dict[str, Any]:
        """Return the first event (seen so far or arriving) that ``match`` accepts."""
        for body in self.seen:
            if match(body):
                return body
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.channel.basic_get(self.queue, no_ack=True)
            if msg is None:
                time.sleep(0.02)
                continue
            assert msg.properties["content_type"] == events.CONTENT_TYPE
            body = events.decode(msg.body)
            self.seen.append(body)
            if match(body):
                return body
        raise AssertionError(f"no matching event in {timeout_s}s; saw "
                             f"{[b['event'] for b in self.seen]}")

    def job(self, event: str, job_id: str) -> dict[str, Any]:
        """Wait for one event about one job."""
        return self.wait_for(lambda b: b["event"] == event and b.get("job_id") == job_id)


@pytest.fixture
def tap(amqp: kombu.Connection) -> Iterator[EventTap]:
    tap = EventTap(amqp)
    yield tap
    tap.close()


def _running(handle: Any) -> None:
    update = next(handle.updates(timeout_s=30))
    assert update.state is JobState.RUNNING


def test_a_removed_running_job_is_killed_and_replies_removed(worker, client, amqp, pool):
    handle = client.submit(JobSpec("sleep", ("300",), pool=pool))
    _running(handle)
    send_order(amqp, ControlOp.REMOVE, (handle.job_id,))
    final = [u for u in handle.updates(timeout_s=30)][-1]
    assert final.state is JobState.REMOVED
    assert final.headers["JobStatus"] == 3
    assert final.exit_by_signal and final.exit_signal == 15
    assert final.reason == "removed by alice: test says so"


def test_a_job_removed_before_it_arrives_is_dropped_without_running(worker, client, amqp,
                                                                    pool):
    job_id = uuid.uuid4().hex
    send_order(amqp, ControlOp.REMOVE, (job_id,))
    time.sleep(0.3)  # the order reaches the node's control queue first
    handle = client.submit(JobSpec("touch", ("ran",), pool=pool, job_id=job_id))
    updates = list(handle.updates(timeout_s=30))
    assert [u.state for u in updates] == [JobState.REMOVED]
    assert updates[0].started_at is None


def test_a_held_running_job_stops_and_replies_held_with_the_reason(tap, worker, client, amqp,
                                                                   pool):
    handle = client.submit(JobSpec("sleep", ("300",), pool=pool))
    _running(handle)
    send_order(amqp, ControlOp.HOLD, (handle.job_id,))
    update = next(u for u in handle.updates(timeout_s=30) if u.state is not JobState.RUNNING)
    assert update.state is JobState.HELD
    assert update.headers["JobStatus"] == 5
    assert update.headers["HoldReason"] == "held by alice: test says so"
    held = tap.job("job.held", handle.job_id)
    assert held["reason"] == "held by alice: test says so" and held["by"] == "alice"


def test_a_held_queued_job_is_handed_to_the_ledger_with_its_request(tap, worker, client, amqp,
                                                                    pool):
    job_id = uuid.uuid4().hex
    send_order(amqp, ControlOp.HOLD, (job_id,))
    time.sleep(0.3)
    handle = client.submit(JobSpec("echo", ("later",), pool=pool, job_id=job_id))
    assert next(handle.updates(timeout_s=30)).state is JobState.HELD
    held = tap.job("job.held", job_id)
    assert held["request"]["headers"]["Cmd"] == "echo"
    assert held["request"]["properties"]["message_id"] == job_id


def test_an_order_for_an_earlier_attempt_does_not_bind_a_later_one(worker, client, amqp,
                                                                   pool):
    job_id = uuid.uuid4().hex
    send_order(amqp, ControlOp.HOLD, (job_id,), attempts={job_id: 0})
    time.sleep(0.3)
    result = client.submit(JobSpec("true", pool=pool, job_id=job_id)).wait(timeout_s=30)
    assert result.exit_code == 0


@pytest.fixture(scope="module")
def mallory_url(rabbitmq_proc: Any, broker_url: str) -> str:
    """A second, untrusted broker user with full permissions on the default vhost."""
    password = uuid.uuid4().hex
    rabbitmq_proc.rabbitctl_output("add_user", "mallory", password)
    rabbitmq_proc.rabbitctl_output("set_permissions", "-p", "/", "mallory", ".*", ".*", ".*")
    return broker_url.replace("guest:guest", f"mallory:{password}")


@pytest.mark.parametrize("sender", ["nobody", "mallory"])
def test_orders_from_untrusted_senders_are_dead_lettered_and_ignored(worker, client, amqp,
                                                                     pool, sender,
                                                                     mallory_url):
    handle = client.submit(JobSpec("sleep", ("1",), pool=pool))
    _running(handle)
    if sender == "nobody":  # no user_id: the broker vouches for no one
        msg_id = send_order(amqp, ControlOp.REMOVE, (handle.job_id,), user_id=None)
        expected = "sender (no user_id) is not trusted"
    else:  # a real, authenticated user who is neither the node's nor an admin
        with kombu.Connection(mallory_url, heartbeat=0) as conn:
            msg_id = send_order(conn, ControlOp.REMOVE, (handle.job_id,), user_id="mallory")
        expected = "sender mallory is not trusted"
    dead = dead_letter_of(amqp, msg_id)
    assert expected in headers_of(dead)["Reason"]
    assert headers_of(dead)["x-original-user-id"] == ("mallory" if sender == "mallory" else "")
    assert handle.wait(timeout_s=30).exit_code == 0


def test_a_drained_node_finishes_its_job_says_offline_and_exits(tap, workers, client, amqp,
                                                                pool):
    name = f"drain-{uuid.uuid4().hex[:6]}"
    proc = workers.start("--name", name, "--heartbeat-interval", "0.5", pools=(pool,))
    handle = client.submit(JobSpec("sleep", ("1",), pool=pool))
    _running(handle)
    send_order(amqp, ControlOp.DRAIN, node=name)
    beat = tap.wait_for(lambda b: b["event"] == "node.heartbeat" and b["node"] == name
                        and b["draining"])
    assert [r["job_id"] for r in beat["running"]] == [handle.job_id]
    assert handle.wait(timeout_s=30).exit_code == 0
    assert proc.wait(timeout=30) == 0
    offline = tap.wait_for(lambda b: b["event"] == "node.offline" and b["node"] == name)
    assert offline["reason"] == "drained by alice"


def test_a_node_with_a_listener_claims_jobs_and_reports_their_life(tap, worker, client, pool):
    result = client.submit(JobSpec("echo", ("hi",), pool=pool)).wait(timeout_s=30)
    job_id = result.job_id
    claimed = tap.job("job.claimed", job_id)
    assert claimed["attempt"] == 1 and claimed["pool"] == pool
    assert claimed["request"]["headers"]["Cmd"] == "echo"
    assert claimed["request"]["routing_key"] == pool
    assert claimed["request"]["properties"]["user_id"] == "guest"  # the owner, broker-checked
    # Claimed as it started: the claim is also the running event, and none other is sent.
    assert claimed["started_at"] and claimed["started_at"] <= claimed["at"]
    exited = tap.job("job.exited", job_id)
    assert not [b for b in tap.seen if b["event"] == "job.running"
                and b.get("job_id") == job_id]
    assert (exited["exit_code"], exited["host"]) == (0, result.host)
    assert exited["result_bytes"] == len(result.archive)


def test_with_a_ledger_a_long_job_is_claimed_while_it_runs_and_one_job_waits_on_deck(
        tap, workers, client, amqp, pool):
    """Claims wait CLAIM_AFTER_S: a long job's comes while it runs, a short one's after it.

    The node's prefetch counts jobs not yet claimed: a busy 1-slot node holds one job
    beyond the one it runs, and the rest stay in the pool's queue for other nodes.
    """
    gate = Path(tempfile.mkdtemp(prefix="dispatch-gate.", dir="/var/tmp"))
    gate.chmod(0o755)  # the job's account waits on it
    try:
        _claims_long_and_short(tap, workers, client, amqp, pool, gate)
    finally:
        shutil.rmtree(gate, ignore_errors=True)


def _claims_long_and_short(tap: EventTap, workers: Any, client: Any, amqp: kombu.Connection,
                           pool: str, gate: Path) -> None:
    workers.start(pools=(pool,), slots=1)
    # It also ends once the gate is gone, so a failed test leaves no job behind.
    long = client.submit(JobSpec("/bin/sh", ("-c", f"until [ -e {gate}/open ] || "
                                             f"[ ! -d {gate} ]; do sleep 0.05; done"),
                                 pool=pool))
    assert next(long.updates(timeout_s=30)).state is JobState.RUNNING
    claimed = tap.job("job.claimed", long.job_id)  # while it still runs: the gate is shut
    assert claimed["started_at"] and not (gate / "open").exists()
    # Shorter than CLAIM_AFTER_S (0.05 s): each is claimed as it ends, after its reply.
    quick = [client.submit(JobSpec("sleep", ("0.02",), pool=pool)) for _ in range(3)]
    time.sleep(0.5)  # time enough for deliveries, were more allowed
    _, ready, _ = amqp.default_channel.queue_declare(topology.pool_queue(pool), passive=True)
    assert ready == 2  # one on deck at the node, two left for other nodes
    (gate / "open").touch()
    assert long.wait(timeout_s=30).exit_code == 0
    for handle in quick:
        result = handle.wait(timeout_s=30)
        assert result.exit_code == 0 and result.duration_s is not None
        claim = tap.job("job.claimed", handle.job_id)
        exited = tap.job("job.exited", handle.job_id)
        started = datetime.datetime.fromisoformat(claim["started_at"])
        made = datetime.datetime.fromisoformat(claim["at"])
        assert (made - started).total_seconds() >= result.duration_s - 0.002
        assert tap.seen.index(claim) < tap.seen.index(exited)  # the ledger learns in order


def test_a_job_can_publish_attributes_while_it_runs(tap, worker, client, pool):
    # The job runs as nobody, with the system's Python and only the standard library:
    # `python3 -m dispatch.chirp` needs nothing else (`dispatch chirp` is the same).
    chirp = "/usr/bin/python3 -m dispatch.chirp set"
    script = f"{chirp} QpiddEndpoint host:5672 && {chirp} JobState hacked"
    handle = client.submit(JobSpec("/bin/sh", ("-c", script), pool=pool,
                                   environment={"PYTHONPATH": str(ROOT)}))
    updates = list(handle.updates(timeout_s=30))
    chirped = [u for u in updates if u.headers.get("Attribute")]
    assert [(u.headers["Attribute"], u.headers["QpiddEndpoint"]) for u in chirped] == [
        ("QpiddEndpoint", "host:5672")]
    final = updates[-1]
    assert final.state is JobState.EXITED and final.exit_code == 1  # JobState is ours
    event = tap.job("job.attribute", handle.job_id)
    assert (event["name"], event["value"]) == ("QpiddEndpoint", "host:5672")


def test_chirp_outside_a_job_is_a_one_line_error(dispatch_cli):
    result = dispatch_cli("chirp", "set", "Name", "value")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dispatch: error: DISPATCH_CHIRP_SOCKET: not set; chirp works only inside a Dispatch job")


def test_a_bad_job_from_another_user_is_dead_lettered_and_the_node_lives_on(worker, client,
                                                                            amqp, pool,
                                                                            mallory_url):
    job_id = uuid.uuid4().hex
    with kombu.Connection(mallory_url, heartbeat=0) as conn:
        publish_job(conn, pool, {"Arguments": "no command"}, message_id=job_id,
                    user_id="mallory")
    dead = dead_letter_of(amqp, job_id)
    assert headers_of(dead)["x-original-user-id"] == "mallory"
    assert "Cmd" in headers_of(dead)["Reason"]
    assert client.submit(JobSpec("true", pool=pool)).wait(timeout_s=30).exit_code == 0
