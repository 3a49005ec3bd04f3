"""Bad input gets a Rejected reply naming the problem, is dead-lettered, and the node lives on."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest

from dispatch import topology

from amqp_helpers import dead_letter_of, get_messages, headers_of, publish_job, reply_queue
from conftest import Workers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rejection_pool(broker_url: str, workdir_root: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Workers]]:
    """One worker for the whole module: it must survive every bad message."""
    pool = f"rej-{uuid.uuid4().hex[:8]}"
    workers = Workers(broker_url, workdir_root, tmp_path_factory.mktemp("rejections"))
    workers.start(pools=(pool,))
    yield pool, workers
    workers.stop_all()


def _traversal_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../etc/evil", "x")
    return buf.getvalue()


BAD_MESSAGES: list[tuple[str, dict[str, Any], bytes, str]] = [
    ("no Cmd", {"Arguments": "hi"}, b"", "Cmd"),
    ("RequestCpus not a number", {"Cmd": "true", "RequestCpus": "abc"}, b"", "RequestCpus"),
    ("Arguments a number", {"Cmd": "echo", "Arguments": 5}, b"", "Arguments"),
    ("Arguments unbalanced quote", {"Cmd": "echo", "Arguments": "'oops"}, b"", "Arguments"),
    ("Environment not NAME=VALUE", {"Cmd": "env", "Environment": "A=1;B"}, b"", "Environment"),
    ("KillSig unknown", {"Cmd": "true", "KillSig": "SIGFOO"}, b"", "KillSig"),
    ("Out escapes the directory", {"Cmd": "true", "Out": "../escape"}, b"", "Out"),
    ("oversized header", {"Cmd": "x" * 70000}, b"", "Cmd"),
    ("Requirements unparsable", {"Cmd": "true", "Requirements": "Memory >= ("}, b"",
     "Requirements"),
    ("body not a zip", {"Cmd": "true"}, b"plain text, not a zip", "body"),
    ("zip member escapes", {"Cmd": "true"}, _traversal_zip(), "body"),
    ("In names no input", {"Cmd": "cat", "In": "data.txt"}, b"", "In"),
    ("more cores than the node", {"Cmd": "true", "RequestCpus": 64}, b"", "RequestCpus"),
    ("more memory than the node", {"Cmd": "true", "RequestMemory": 2**30}, b"",
     "RequestMemory"),
    ("Requirements never met", {"Cmd": "true", "Requirements": 'OpSys == "WINDOWS"'}, b"",
     "Requirements not met"),
]


@pytest.mark.parametrize(("case", "headers", "body", "named"), BAD_MESSAGES,
                         ids=[c[0] for c in BAD_MESSAGES])
def test_a_bad_job_gets_a_rejected_reply_naming_the_problem_and_is_dead_lettered(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers], case: str,
        headers: dict[str, Any], body: bytes, named: str) -> None:
    pool, _ = rejection_pool
    replies = reply_queue(amqp)
    job_id = uuid.uuid4().hex
    props = {"content_type": "application/zip"} if body else {}
    publish_job(amqp, pool, headers, body=body, message_id=job_id, reply_to=replies, **props)

    (reply,) = get_messages(amqp, replies, 1)
    got = headers_of(reply)
    assert got["JobState"] == "Rejected"
    assert got["JobStatus"] == 4
    assert got["JobId"] == job_id
    assert named in got["Reason"]
    assert reply.properties["correlation_id"] == job_id

    dead = dead_letter_of(amqp, job_id)
    assert named in headers_of(dead)["Reason"]
    kept = dead.body if isinstance(dead.body, bytes) else dead.body.encode()
    assert kept == body


def test_a_bad_job_without_a_reply_address_is_dead_lettered(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers]) -> None:
    pool, _ = rejection_pool
    publish_job(amqp, pool, {"JobId": "no-reply-1", "Arguments": "x"})
    dead = dead_letter_of(amqp, "no-reply-1")
    assert "Cmd" in headers_of(dead)["Reason"]
    assert headers_of(dead)["x-original-routing-key"] == pool


def test_a_classad_quoted_bad_job_gets_a_quoted_rejected_reply(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers]) -> None:
    pool, _ = rejection_pool
    replies = reply_queue(amqp)
    publish_job(amqp, pool, {"Cmd": '"/bin/true"', "RequestCpus": "lots"},
                message_id="quoted-bad", reply_to=replies)
    (reply,) = get_messages(amqp, replies, 1)
    got = headers_of(reply)
    assert got["JobState"] == '"Rejected"'
    assert got["Reason"].startswith('"') and "RequestCpus" in got["Reason"]


def test_the_node_still_runs_good_jobs_after_every_bad_one(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers]) -> None:
    pool, workers = rejection_pool
    replies = reply_queue(amqp)
    publish_job(amqp, pool, {"Cmd": "echo", "Arguments": "still alive"},
                message_id="after-bad", reply_to=replies)
    (exited,) = get_messages(amqp, replies, 1)  # too short for a Running reply
    assert headers_of(exited)["JobState"] == "Exited"
    assert headers_of(exited)["ExitCode"] == 0
    assert all(proc.poll() is None for proc in workers.procs)


KOMBU_ENCODINGS = ["binary", "utf-8", "gzip", "made-up", None]


@pytest.mark.parametrize("encoding", KOMBU_ENCODINGS, ids=[str(e) for e in KOMBU_ENCODINGS])
def test_a_plain_kombu_producers_job_without_cmd_is_rejected_whatever_its_encoding(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers], encoding: str | None) -> None:
    pool, workers = rejection_pool
    replies = reply_queue(amqp)
    job_id = uuid.uuid4().hex
    producer = kombu.Producer(amqp.channel(), exchange=kombu.Exchange("dispatch.jobs",
                                                                      passive=True))
    extra = {} if encoding is None else {"content_encoding": encoding}
    producer.publish(b"", routing_key=pool, headers={"Arguments": "x"}, reply_to=replies,
                     message_id=job_id, **extra)

    (reply,) = get_messages(amqp, replies, 1)
    assert headers_of(reply)["JobState"] == "Rejected"
    assert "Cmd" in headers_of(reply)["Reason"]
    dead = dead_letter_of(amqp, job_id)
    assert dead.body in (b"", "")
    assert all(proc.poll() is None for proc in workers.procs)


@pytest.mark.parametrize("encoding", ["gzip", "base64", "made-up"])
def test_an_input_archive_sent_with_an_encoding_that_is_not_raw_bytes_is_rejected_naming_it(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers], encoding: str) -> None:
    pool, _ = rejection_pool
    replies = reply_queue(amqp)
    job_id = uuid.uuid4().hex
    body = _zip_of({"in.txt": b"hello"})
    publish_job(amqp, pool, {"Cmd": "cat", "Arguments": "in.txt"}, body=body,
                message_id=job_id, reply_to=replies, content_type="application/zip",
                content_encoding=encoding)
    (reply,) = get_messages(amqp, replies, 1)
    assert headers_of(reply)["JobState"] == "Rejected"
    assert "content_encoding" in headers_of(reply)["Reason"]
    assert encoding in headers_of(reply)["Reason"]
    dead = dead_letter_of(amqp, job_id)
    assert dead.body == body


@pytest.mark.parametrize("encoding", ["binary", "utf-8", None])
def test_an_input_archive_sent_as_raw_bytes_by_kombu_runs(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers], encoding: str | None) -> None:
    pool, _ = rejection_pool
    replies = reply_queue(amqp)
    producer = kombu.Producer(amqp.channel(), exchange=kombu.Exchange("dispatch.jobs",
                                                                      passive=True))
    extra = {} if encoding is None else {"content_encoding": encoding}
    producer.publish(_zip_of({"in.txt": b"hello"}), routing_key=pool,
                     headers={"Cmd": "cat", "Arguments": "in.txt"}, reply_to=replies,
                     message_id=uuid.uuid4().hex, content_type="application/zip", **extra)
    (exited,) = get_messages(amqp, replies, 1)
    assert headers_of(exited)["JobState"] == "Exited"
    assert headers_of(exited)["ExitCode"] == 0
    with zipfile.ZipFile(io.BytesIO(exited.body)) as zf:
        assert zf.read("job.out") == b"hello"  # the input arrived byte for byte


def _zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_rejected_job_the_broker_will_not_dead_letter_is_parked_on_the_spool_then_acked(
        rabbitmq_proc: Any, vhost: str, vhost_url: str, workdir_root: Path,
        tmp_path: Path) -> None:
    # The dead-letter queue refuses everything: the broker nacks the node's copy.
    rabbitmq_proc.rabbitctl_output(
        "set_policy", "-p", vhost, "refuse-dead", r"^dispatch\.dead$",
        '{"max-length": 0, "overflow": "reject-publish"}', "--apply-to", "queues")
    pool = f"park-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    workers = Workers(vhost_url, workdir_root, tmp_path)
    try:
        workers.start("--spool-dir", str(spool), pools=(pool,))
        with kombu.Connection(vhost_url, heartbeat=0) as conn:
            replies = reply_queue(conn)
            body = b"\x00not a zip, kept byte for byte\xff"
            publish_job(conn, pool, {"Cmd": "true"}, body=body, message_id="parked-1",
                        reply_to=replies, content_type="application/zip")
            (reply,) = get_messages(conn, replies, 1)
            assert headers_of(reply)["JobState"] == "Rejected"
            deadline = time.monotonic() + 20
            while not (spool / "parked-1.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (spool / "parked-1.message").read_bytes() == body
            meta = json.loads((spool / "parked-1.json").read_text())
            assert "body" in meta["reason"] and meta["properties"]["reply_to"] == replies
            assert (spool / "parked-1.message").stat().st_mode & 0o077 == 0
            # Acked once kept: nothing left in the pool queue, nothing unacked.
            channel = conn.channel()
            deadline = time.monotonic() + 20
            while channel.queue_declare(topology.pool_queue(pool), passive=True)[1] \
                    or "parked-1" not in workers.log():
                assert time.monotonic() < deadline, workers.log()
                time.sleep(0.05)
            publish_job(conn, pool, {"Cmd": "echo", "Arguments": "after"},
                        message_id="after-park", reply_to=replies)
            (exited,) = get_messages(conn, replies, 1)
            assert headers_of(exited)["JobState"] == "Exited"
        assert "message kept in" in workers.log()
        assert all(proc.poll() is None for proc in workers.procs)
    finally:
        workers.stop_all()


def test_running_is_sent_transient_and_the_final_reply_persistent(
        amqp: kombu.Connection, rejection_pool: tuple[str, Workers]) -> None:
    pool, _ = rejection_pool
    replies = reply_queue(amqp)
    # Long enough for a Running reply (the node's --running-after is 0.05 s).
    publish_job(amqp, pool, {"Cmd": "sleep", "Arguments": "0.2"}, message_id="durability-1",
                reply_to=replies)
    running, exited = get_messages(amqp, replies, 2)
    assert headers_of(running)["JobState"] == "Running"
    assert running.properties["delivery_mode"] == 1  # advisory: lost with a broker restart
    assert headers_of(exited)["JobState"] == "Exited"
    assert exited.properties["delivery_mode"] == 2  # the durable record
