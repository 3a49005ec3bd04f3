"""Large results travel in checked chunks; undeliverable results stay on the node's spool."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu
import pytest

from dispatch import headers, schema
from dispatch.chunks import (
    CHUNK_CONTENT_TYPE,
    DEFAULT_MAX_RESULT_BYTES,
    ChunkError,
    ChunkPlace,
    Gatherer,
    Reassembly,
    Splitter,
    Summary,
    chunk_count,
    part_name,
)
from dispatch.client import Client
from dispatch.errors import InvalidMessageError
from dispatch.job import JobSpec, JobState, JobUpdate

from amqp_helpers import publish_job, reply_queue
from conftest import Workers

MIB = 1024 * 1024
# Writes SIZE random bytes and their SHA-256: random data does not compress, so the zip
# is as big as the file.
WRITE_RANDOM = "head -c {size} /dev/urandom > data.bin && sha256sum data.bin > data.sha256"
# Waits (at most 30 s) until the test puts a file named go in the job's directory.
WAIT_FOR_GO = "for i in $(seq 600); do [ -e go ] && break; sleep 0.05; done; "


def _member_digest(archive: zipfile.ZipFile, name: str) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with archive.open(name) as member:
        while block := member.read(4 * MIB):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def _assert_intact(archive_bytes: bytes, size: int) -> None:
    """The archive holds data.bin of ``size`` bytes with the SHA-256 the job computed."""
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        written = archive.read("data.sha256").decode().split()[0]
        assert _member_digest(archive, "data.bin") == (size, written)


# -- the chunk codec (pure) -------------------------------------------------------------

def _split(data: bytes, chunk_bytes: int) -> tuple[list[tuple[ChunkPlace, bytes]], Summary]:
    splitter = Splitter(io.BytesIO(data), len(data), chunk_bytes)
    chunks = []
    while (item := splitter.next()) is not None:
        chunks.append(item)
    return chunks, splitter.summary()


def test_an_archive_split_into_chunks_reassembles_to_the_same_bytes(tmp_path: Path) -> None:
    data = os.urandom(10_001)
    chunks, summary = _split(data, 1000)
    assert [p.index for p, _ in chunks] == list(range(11))
    assert [p.offset for p, _ in chunks] == [i * 1000 for i in range(11)]
    assert summary == Summary(10_001, hashlib.sha256(data).hexdigest(), 11)
    whole = Reassembly(tmp_path / "r.part")
    for place, piece in chunks:
        assert whole.add(place, piece)
    assert not whole.add(*chunks[4])  # a redelivered chunk is skipped
    assert whole.finish(summary) == data
    assert stat.S_IMODE((tmp_path / "r.part").stat().st_mode) == 0o600


def test_a_chunk_zero_starts_the_reassembly_again(tmp_path: Path) -> None:
    first, _ = _split(os.urandom(3000), 1000)
    data = os.urandom(3000)
    second, summary = _split(data, 1000)
    whole = Reassembly(tmp_path / "r.part")
    for item in [*first[:2], *second]:  # another run of the same attempt sends it all again
        whole.add(*item)
    assert whole.finish(summary) == data


@pytest.mark.parametrize(("drop", "tamper", "problem"), [
    (1, None, "chunk 2 of 3 starts at byte 2000 but only 1000 bytes came before it"),
    (2, None, "2000 of 3000 bytes arrived in 3 chunks: chunks are missing"),
    (None, 1, "SHA-256 .* a chunk was altered"),
])
def test_a_missing_or_altered_chunk_is_refused_naming_the_problem(
        tmp_path: Path, drop: int | None, tamper: int | None, problem: str) -> None:
    chunks, summary = _split(os.urandom(3000), 1000)
    whole = Reassembly(tmp_path / "r.part")
    with pytest.raises(ChunkError, match=problem):
        for place, piece in chunks:
            if place.index != drop:
                whole.add(place, b"x" * len(piece) if place.index == tamper else piece)
        whole.finish(summary)


@pytest.mark.parametrize(("hdrs", "field"), [
    ({"ResultChunk": 0, "ResultChunks": 2}, "ResultOffset"),
    ({"ResultChunk": 2, "ResultChunks": 2, "ResultOffset": 0}, "ResultChunk"),
    ({"ResultChunk": "0", "ResultChunks": 2, "ResultOffset": 0}, "ResultChunk"),
])
def test_malformed_chunk_headers_are_refused_naming_the_header(hdrs: dict[str, Any],
                                                               field: str) -> None:
    with pytest.raises(ChunkError, match=field):
        ChunkPlace.from_headers(hdrs)


def test_a_gatherer_started_again_carries_on_and_ignores_stale_attempts(tmp_path: Path) -> None:
    data = os.urandom(3000)
    chunks, summary = _split(data, 1000)
    first = Gatherer(tmp_path)
    for place, piece in chunks[:2]:
        first.add(place.to_headers("j1", 2), piece, {})
    first.add(chunks[2][0].to_headers("j1", 1), b"stale", {"j1": 2})
    again = Gatherer(tmp_path)  # a new client process over the same files
    again.add(chunks[2][0].to_headers("j1", 2), chunks[2][1], {})
    final = JobUpdate("j1", JobState.EXITED, attempt=2, headers=summary.to_headers())
    assert again.finish(final).archive == data
    assert not again.path("j1", 1).exists()
    again.discard("j1", 2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChunkError, match="malformed result chunk: ResultOffset"):
        again.add({"JobId": "j1", "ResultChunk": 0, "ResultChunks": 1}, b"", {})


def test_a_chunk_directory_open_to_other_users_is_refused(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    place, piece = _split(b"abc", 10)[0][0]
    for name in ("open", "link"):
        with pytest.raises(PermissionError, match="not a private directory"):
            Gatherer(tmp_path / name).add(place.to_headers("j1", 1), piece, {})
    assert list((tmp_path / "open").iterdir()) == []


def test_a_job_id_that_is_no_file_name_gets_a_safe_part_name() -> None:
    assert part_name("job-1", 2) == "job-1.2.part"
    assert "/" not in part_name("../../etc/passwd", 1)


# -- the protocol's documentation -------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "schemas" / "README.md"
_JSONC = re.compile(r"^```jsonc\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def _readme_chunk_examples() -> list[dict[str, Any]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Large results\n"):text.index("\n## Undeliverable results\n")]
    found = [json.loads(block["body"]) for block in _JSONC.finditer(section)]
    assert all(example.pop("schema") == schema.JOB_REPLY for example in found)
    return [example.pop("message") for example in found]


def test_the_readme_shows_chunks_and_a_final_reply_exactly_as_a_node_sends_them() -> None:
    *chunk_msgs, final = _readme_chunk_examples()
    assert len(chunk_msgs) == 2
    for message in [*chunk_msgs, final]:
        schema.validate(schema.JOB_REPLY, message, InvalidMessageError)
    env = headers.envelope(final["properties"], final["headers"])
    update = headers.decode_reply(final["headers"], b"")
    summary = Summary.from_headers(update.headers)
    assert summary is not None
    assert summary.chunks == chunk_count(summary.size_bytes, DEFAULT_MAX_RESULT_BYTES)
    fields = {"host": update.host, "exit_code": update.exit_code,
              "exit_by_signal": update.exit_by_signal, "duration_s": update.duration_s}
    assert final["headers"] == {**headers.reply_headers(JobState.EXITED, env, **fields),
                                **summary.to_headers()}
    for message in chunk_msgs:
        place = ChunkPlace.from_headers(message["headers"])
        assert message["headers"] == place.to_headers(env.job_id, env.attempt)
        assert (place.count, place.offset) == (summary.chunks,
                                              place.index * DEFAULT_MAX_RESULT_BYTES)
        assert message["properties"] == {**final["properties"], "content_encoding": "binary",
                                          "content_type": CHUNK_CONTENT_TYPE}
    assert ChunkPlace.from_headers(chunk_msgs[-1]["headers"]).index == summary.chunks - 1


@pytest.mark.parametrize(("extra", "field"), [
    ({"JobState": "Exited"}, None),  # a chunk is no status update
    ({"ResultBytes": 5}, None),
    ({"ResultChunk": None}, "ResultChunk"),
])
def test_the_reply_schema_keeps_chunks_and_replies_apart(extra: dict[str, Any],
                                                         field: str | None) -> None:
    chunk = {"JobId": "j1", "Attempt": 1, "ResultChunk": 0, "ResultChunks": 2,
             "ResultOffset": 0}
    schema.validate(schema.JOB_REPLY, {"headers": chunk}, InvalidMessageError)
    chunk.update(extra)
    with pytest.raises(InvalidMessageError) as caught:
        schema.validate(schema.JOB_REPLY, {"headers": chunk}, InvalidMessageError)
    assert caught.value.field == field


def test_the_reply_schema_wants_the_whole_summary_on_a_chunked_final_reply() -> None:
    final = {"JobId": "j1", "JobStatus": 4, "JobState": "Exited", "RemoteHost": "n1",
             "ExitCode": 0, "ExitBySignal": False, "JobDuration": 1.0, "ResultBytes": 5,
             "ResultChunks": 1}
    schema.validate(schema.JOB_REPLY, {"headers": {**final, "ResultSha256": "0" * 64}},
                    InvalidMessageError)
    with pytest.raises(InvalidMessageError) as caught:
        schema.validate(schema.JOB_REPLY, {"headers": final}, InvalidMessageError)
    assert caught.value.field == "ResultSha256"


# -- the real thing: worker subprocess, broker, client -------------------------------------

@pytest.fixture
def vhost_workers(vhost_url: str, workdir_root: Path, tmp_path: Path) -> Iterator[Workers]:
    """Workers on the ledger's vhost."""
    (tmp_path / "workers").mkdir()
    started = Workers(vhost_url, workdir_root, tmp_path / "workers")
    yield started
    started.stop_all()


def test_a_300_mib_result_arrives_intact_as_one_final_update(
        ledger_service, vhost_workers: Workers, vhost_url: str, pool: str,
        tmp_path: Path) -> None:
    # Zipping 300 MiB takes longer than the test broker's consumer_timeout (3 s): the
    # ledger's claim acks the job message early, as in production for long jobs.
    ledger_service.start("--pool", pool)
    workers = vhost_workers
    workers.start(pools=(pool,))
    size = 300 * MIB
    with Client(vhost_url, chunk_dir=tmp_path / "chunks") as client:
        handle = client.submit(JobSpec("/bin/sh", ("-c", WRITE_RANDOM.format(size=size)),
                                       pool=pool))
        updates = list(handle.updates(timeout_s=100))
    assert [u.state for u in updates] == [JobState.RUNNING, JobState.EXITED]
    final = updates[-1]
    assert final.exit_code == 0, final
    assert final.headers[headers.RESULT_CHUNKS] == -(-len(final.archive) // (16 * MIB)) == 19
    assert final.headers[headers.RESULT_BYTES] == len(final.archive)
    assert final.headers[headers.RESULT_SHA256] == hashlib.sha256(final.archive).hexdigest()
    _assert_intact(final.archive, size)
    assert list((tmp_path / "chunks").iterdir()) == []  # the chunks went once handed out
    assert "goes in 19 chunks" in workers.log()


def _collect(conn: kombu.Connection, queue: str, timeout_s: float = 30) -> list[amqp.Message]:
    """Return the messages of ``queue`` up to and including the first final reply."""
    channel = conn.channel()
    found: list[amqp.Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = channel.basic_get(queue, no_ack=True)
            if msg is None:
                time.sleep(0.02)
                continue
            found.append(msg)
            if msg.headers.get(headers.JOB_STATE) in ("Exited", "Rejected", "Removed"):
                return found
    finally:
        channel.close()
    raise AssertionError(f"{queue}: no final reply in {timeout_s}s, got {len(found)} messages")


def test_an_htcondor_style_listener_sees_chunks_without_a_state_and_one_exited_reply(
        workers, pool: str, amqp, tmp_path: Path) -> None:
    # --running-after 0: a Running reply comes first however fast the job is.
    workers.start("--max-result-bytes", str(MIB), "--running-after", "0", pools=(pool,))
    replies = reply_queue(amqp)
    size = 3 * MIB
    script = WRITE_RANDOM.format(size=size)
    publish_job(amqp, pool, {"Cmd": "/bin/sh", "Arguments": ["-c", script]},
                message_id="big-raw", reply_to=replies)
    messages = _collect(amqp, replies)
    states = [m.headers.get(headers.JOB_STATE) for m in messages]
    assert states[0] == "Running" and states[-1] == "Exited"
    chunk_msgs = messages[1:-1]
    assert all(headers.JOB_STATE not in m.headers and headers.JOB_STATUS not in m.headers
               for m in chunk_msgs)
    final = messages[-1]
    assert not final.body and final.headers[headers.EXIT_CODE] == 0
    summary = Summary.from_headers(final.headers)
    assert summary is not None and summary.chunks == len(chunk_msgs) == 4
    whole = Reassembly(tmp_path / "raw.part")
    for index, msg in enumerate(chunk_msgs):
        place = ChunkPlace.from_headers(msg.headers)
        assert (place.index, place.count, msg.headers[headers.JOB_ID]) == (index, 4, "big-raw")
        assert 0 < len(msg.body) <= MIB
        whole.add(place, msg.body)
    _assert_intact(whole.finish(summary), size)


def test_a_small_result_is_still_one_plain_reply(workers, pool: str, amqp) -> None:
    workers.start("--max-result-bytes", str(MIB), pools=(pool,))
    replies = reply_queue(amqp)
    publish_job(amqp, pool, {"Cmd": "echo", "Arguments": "small"}, message_id="small-raw",
                reply_to=replies)
    (exited,) = _collect(amqp, replies)  # too short for a Running reply: one reply in all
    assert exited.headers[headers.JOB_STATE] == "Exited"
    assert zipfile.ZipFile(io.BytesIO(exited.body)).read("job.out") == b"small\n"
    assert exited.properties["content_type"] == "application/zip"
    assert not {h for h in exited.headers if h.startswith("Result")}


def _publish_crafted(conn: kombu.Connection, queue: str, job_id: str, data: bytes, *,
                     drop: int | None = None, tamper: int | None = None,
                     only: int | None = None, final: bool = True) -> None:
    """Publish a chunked result for ``job_id`` as a node would, less a chunk or altered.

    ``only``: publish that chunk and the final reply; ``final=False``: no final reply.
    """
    chunks, summary = _split(data, 1000)
    channel = conn.channel()
    try:
        for place, piece in chunks:
            if place.index == drop or only not in (None, place.index):
                continue
            body = piece[::-1] if place.index == tamper else piece
            channel.basic_publish(amqp.Message(body, application_headers=place.to_headers(
                job_id, 1), delivery_mode=2, content_type="application/octet-stream",
                content_encoding="binary"), exchange="", routing_key=queue)
        if final:
            reply = {headers.JOB_ID: job_id, headers.JOB_STATUS: 4, headers.JOB_STATE: "Exited",
                     headers.ATTEMPT: 1, headers.REMOTE_HOST: "crafted", headers.EXIT_CODE: 0,
                     headers.EXIT_BY_SIGNAL: False, headers.JOB_DURATION: 0.5,
                     **summary.to_headers()}
            channel.basic_publish(amqp.Message(b"", application_headers=reply, delivery_mode=2),
                                  exchange="", routing_key=queue)
    finally:
        channel.close()


@pytest.mark.parametrize(("drop", "tamper", "problem"), [
    (None, None, None),
    (None, 1, r"result refused: the 3000 bytes reassembled have SHA-256 \w+, not \w+ as sent"),
    (1, None, "result refused: chunk 2 of 3 starts at byte 2000 .* a chunk before it is missing"),
    (2, None, "result refused: 2000 of 3000 bytes arrived in 3 chunks: chunks are missing"),
])
def test_a_client_refuses_a_result_with_a_tampered_or_missing_chunk(
        broker_url: str, amqp, tmp_path: Path, drop: int | None, tamper: int | None,
        problem: str | None) -> None:
    data = os.urandom(3000)
    job_id = f"crafted-{uuid.uuid4().hex[:8]}"
    with Client(broker_url, chunk_dir=tmp_path / "chunks") as client:
        _publish_crafted(amqp, client.reply_queue, job_id, data, drop=drop, tamper=tamper)
        handle = client.attach(job_id)
        if problem is None:
            assert handle.wait(timeout_s=20).archive == data
        else:
            with pytest.raises(ChunkError, match=f"job {job_id}: {problem}"):
                handle.wait(timeout_s=20)
        # Refused or not, nothing is left behind: the queue is empty, the chunks are gone.
        assert client.next_update(timeout_s=0.5) is None
    _, count, _ = amqp.default_channel.queue_declare(client.reply_queue, passive=True)
    assert count == 0
    assert list((tmp_path / "chunks").iterdir()) == []


def test_a_client_started_again_with_the_same_id_carries_on_with_the_chunks_it_stored(
        broker_url: str, amqp, tmp_path: Path) -> None:
    data = os.urandom(3000)
    job_id = f"resumed-{uuid.uuid4().hex[:8]}"
    client_id = f"resume-{uuid.uuid4().hex[:8]}"
    chunk_dir = tmp_path / "chunks"
    with Client(broker_url, client_id=client_id, chunk_dir=chunk_dir) as first:
        _publish_crafted(amqp, first.reply_queue, job_id, data, drop=2, final=False)
        part = first.chunks.path(job_id, 1)
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size == 2000):
            assert time.monotonic() < deadline, "the first client never stored two chunks"
            assert first.next_update(timeout_s=0.1) is None
    _publish_crafted(amqp, first.reply_queue, job_id, data, only=2)
    with Client(broker_url, client_id=client_id, chunk_dir=chunk_dir) as again:
        assert again.attach(job_id).wait(timeout_s=20).archive == data
    assert list(chunk_dir.iterdir()) == []


# -- undeliverable results -----------------------------------------------------------------

def _workdir_of(root: Path, job_id: str, timeout_s: float = 20) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(root.glob(f"{job_id}.*"))
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no working directory for {job_id} under {root}")


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("size", [64 * 1024, 3 * MIB], ids=["one-reply", "chunked"])
def test_a_reply_queue_deleted_before_the_job_ends_leaves_the_result_on_the_spool(
        workers, pool: str, amqp, workdir_root: Path, tmp_path: Path, size: int) -> None:
    chunked = size > MIB
    spool = tmp_path / "spool" if chunked else workdir_root / ".spool"
    args = ("--max-result-bytes", str(MIB), *(("--spool-dir", str(spool)) if chunked else ()))
    workers.start(*args, pools=(pool,))
    replies = reply_queue(amqp)
    job_id = f"lost-{uuid.uuid4().hex[:8]}"
    script = WAIT_FOR_GO + WRITE_RANDOM.format(size=size)
    publish_job(amqp, pool, {"Cmd": "/bin/sh", "Arguments": ["-c", script]},
                message_id=job_id, reply_to=replies)
    assert _collect_running(amqp, replies)
    amqp.default_channel.queue_delete(replies)
    (_workdir_of(workdir_root, job_id) / "go").touch()  # now the job may end

    _wait_for(spool / f"{job_id}.json")
    kept, meta_path = spool / f"{job_id}.zip", spool / f"{job_id}.json"
    assert stat.S_IMODE(kept.stat().st_mode) == stat.S_IMODE(meta_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    _assert_intact(kept.read_bytes(), size)
    meta = json.loads(meta_path.read_text())
    assert meta["headers"][headers.JOB_STATE] == "Exited"
    assert meta["headers"][headers.EXIT_CODE] == 0
    assert meta["reply_to"] == {"exchange": "", "routing_key": replies}
    assert "NO_ROUTE" in meta["returned"]
    assert (meta["zip"], meta["result_bytes"]) == (kept.name, kept.stat().st_size)
    _wait_for_log(workers, f"job {job_id}: reply undeliverable")
    assert f"result kept in {kept}" in workers.log()
    assert "requeueing" not in workers.log()


def _collect_running(conn: kombu.Connection, queue: str) -> bool:
    channel = conn.channel()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            msg = channel.basic_get(queue, no_ack=True)
            if msg is not None:
                return bool(msg.headers.get(headers.JOB_STATE) == "Running")
            time.sleep(0.02)
    finally:
        channel.close()
    return False


def _wait_for_log(workers, text: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in workers.log():
        assert time.monotonic() < deadline, f"not logged: {text!r}\n{workers.log()}"
        time.sleep(0.05)


def test_the_worker_refuses_a_max_result_size_the_broker_would_refuse(dispatch_cli) -> None:
    done = dispatch_cli("worker", "--max-result-bytes", str(129 * MIB), "--describe")
    assert done.returncode == 2
    assert "--max-result-bytes" in done.stderr
