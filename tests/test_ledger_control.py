"""rm/hold/release through the real ledger, with broker users made by ``dispatch users add``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import amqp
import pytest
from fixtures_ledger import Wire, user_url

from dispatch import events, topology
from dispatch.client import Client
from dispatch.job import JobSpec, JobState
from dispatch.ledger import LedgerState

from conftest import ROOT, Workers

CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def _dispatch(*args: str, url: str | None = None, stdin: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"DISPATCH_BROKER_URL": url} if url else {}
    return subprocess.run([sys.executable, "-m", "dispatch", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                          env={**os.environ, **extra, **(env or {})})


@pytest.fixture
def add_user(rabbitmq_proc, vhost):
    node = rabbitmq_proc.envvars["RABBITMQ_NODENAME"]
    made = []

    def add(name: str, *flags: str, password: str | None = None) -> str:
        done = _dispatch("users", "add", name, "-p", vhost, "-n", node, "--rabbitmqctl", CTL,
                         *flags, *(("--password-stdin",) if password else ()),
                         stdin=(password + "\n") if password else None)
        assert done.returncode == 0, done.stderr
        made.append(name)
        return password or done.stdout.strip()

    yield add
    for name in made:
        rabbitmq_proc.rabbitctl_output("delete_user", name)


def _submit_as(wire_url: str, job_id: str, pool: str, owner: str) -> None:
    """Publish a job the way any producer does, with the broker-checked user_id."""
    wire = Wire(wire_url)
    try:
        msg = amqp.Message(b"", application_headers={"Cmd": "/bin/true"}, message_id=job_id,
                           correlation_id=job_id, user_id=owner, delivery_mode=2)
        wire.channel.basic_publish(msg, topology.jobs_exchange(), routing_key=pool,
                                   mandatory=True)
    finally:
        wire.close()


def test_a_new_user_submits_and_reads_its_replies_but_not_another_users(
        rabbitmq_proc, vhost, vhost_url, add_user, workdir_root, tmp_path, pool):
    alice = user_url(rabbitmq_proc, vhost, "alice", add_user("alice", password="alice-pw-1"))
    bob_password = add_user("bob")
    assert len(bob_password) >= 16
    bob = user_url(rabbitmq_proc, vhost, "bob", bob_password)
    workers = Workers(vhost_url, workdir_root, tmp_path)
    try:
        workers.start(pools=(pool,))
        with Client(alice, client_id="alice-laptop") as client:
            result = client.submit(JobSpec("/bin/echo", ("hi",), pool=pool)).wait(60)
        assert result.update.state is JobState.EXITED and result.exit_code == 0
    finally:
        workers.stop_all()
    for attempt in (lambda ch: ch.basic_consume(topology.reply_queue("alice-laptop")),
                    lambda ch: ch.queue_declare(topology.reply_queue("alice-x"), durable=True)):
        wire = Wire(bob)
        try:
            with pytest.raises(amqp.exceptions.AccessRefused):
                attempt(wire.channel)
        finally:
            wire.close()
    wire = Wire(bob)
    try:
        wire.channel.queue_declare(topology.reply_queue("bob-own"), durable=False,
                                   exclusive=True)
    finally:
        wire.close()


def test_only_the_owner_or_an_admin_may_remove_hold_or_release_a_job(
        rabbitmq_proc, vhost, ledger_service, wire, add_user, pool):
    alice = user_url(rabbitmq_proc, vhost, "alice", add_user("alice", password="alice-pw-1"))
    bob = user_url(rabbitmq_proc, vhost, "bob", add_user("bob", password="bob-pw-1"))
    carol = user_url(rabbitmq_proc, vhost, "carol", add_user("carol", "--admin",
                                                             password="carol-pw-1"))
    ledger_service.start("--pool", pool, env={"DISPATCH_ADMINS": "carol"})
    orders = wire.tap(topology.control_exchange(), "job.#")
    job_id = f"c-{uuid.uuid4().hex[:8]}"
    _submit_as(alice, job_id, pool, "alice")
    ledger_service.wait_for(lambda led: led.job(job_id))

    refused = _dispatch("rm", job_id, url=bob)
    assert refused.returncode == 1
    assert f"{job_id}: permission denied: bob may not remove a job owned by alice" in refused.stderr
    assert "remove by bob refused: owned by alice" in ledger_service.log()

    held = _dispatch("hold", job_id, "--reason", "wait for data", url=alice)
    assert held.returncode == 0, held.stderr
    order = wire.get(orders)
    assert order.properties["user_id"] == "guest"
    assert order.delivery_info["routing_key"] == "job.hold"
    body = events.decode(order.body, what="control")
    assert (body["op"], body["job_ids"], body["by"], body["reason"]) == (
        "hold", [job_id], "alice", "wait for data")
    rec = ledger_service.wait_for(lambda led: led.job(job_id))
    assert (rec.state, rec.reason) == (LedgerState.HELD, "wait for data")

    released = _dispatch("release", job_id, "--json", url=alice)
    assert released.returncode == 0, released.stderr
    assert '"ok": true' in released.stdout
    assert events.decode(wire.get(orders).body, what="control")["attempts"] == {job_id: 2}
    assert wire.depth(topology.pool_queue(pool)) == 2  # the original, then attempt 2

    again = _dispatch("rm", job_id, url=bob)
    assert again.returncode == 1
    removed = _dispatch("rm", job_id, url=carol)
    assert removed.returncode == 0, removed.stderr
    assert f"{job_id}: remove accepted (Removed)" in removed.stdout
    rec = ledger_service.wait_for(lambda led: led.job(job_id))
    assert rec.state is LedgerState.REMOVED and rec.attempt == 2


def test_rm_of_an_unknown_job_and_without_a_ledger_are_one_line_errors(
        rabbitmq_proc, vhost, vhost_url, ledger_service):
    no_ledger = _dispatch("rm", "nope", "--timeout", "3", url=vhost_url)
    assert no_ledger.returncode == 125
    assert "no ledger" in no_ledger.stderr and len(no_ledger.stderr.splitlines()) == 1
    ledger_service.start()
    unknown = _dispatch("rm", "nope", url=vhost_url)
    assert unknown.returncode == 1
    assert "nope: no such job in the ledger" in unknown.stderr


def test_users_add_refuses_a_name_that_cannot_prefix_client_ids():
    done = _dispatch("users", "add", "bad name!")
    assert done.returncode == 2 and "NAME:" in done.stderr


