"""Job arrays: N jobs sharing an id, each knowing its index; waited for as one."""

from __future__ import annotations

import json
import uuid

import amqp
import kombu

from dispatch import headers
from dispatch.client import Client
from dispatch.job import JobSpec, JobState


def test_an_array_runs_every_index_once(worker, client, pool, tmp_path):
    handles = client.submit_array(
        JobSpec("/bin/sh", ("-c", "echo $DISPATCH_ARRAY_INDEX/$DISPATCH_ARRAY_SIZE"), pool=pool), 4)
    array_id = handles[0].job_id.rpartition(".")[0]
    assert [h.job_id for h in handles] == [f"{array_id}.{i}" for i in range(4)]
    seen = []
    for handle in handles:
        result = handle.wait(timeout_s=30)
        result.extract(tmp_path / handle.job_id)
        seen.append((tmp_path / handle.job_id / "job.out").read_text().strip())
    assert seen == ["0/4", "1/4", "2/4", "3/4"]


def test_submit_array_waits_with_a_bar_and_summarises_exit_codes(worker, dispatch_cli, pool,
                                                                 tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"command: /bin/sh -c 'exit $((DISPATCH_ARRAY_INDEX % 2))'\n"
                   f"pool: {pool}\narray: 4\n")
    result = dispatch_cli("submit", str(job), "--wait", "--timeout", "60")
    assert result.returncode == 1, result.stderr
    assert "4 jobs: 2 exit 0, 2 exit 1" in result.stderr


def test_wait_takes_an_array_id(worker, dispatch_cli, pool):
    submitted = dispatch_cli("submit", "--array", "3", "--pool", pool, "--json", "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    record = json.loads(submitted.stdout)
    assert len(record["job_ids"]) == 3
    waited = dispatch_cli("wait", record["array_id"], "--timeout", "60", "--json")
    assert waited.returncode == 0, waited.stderr
    lines = [json.loads(line) for line in waited.stdout.splitlines()]
    assert sorted(line["job_id"] for line in lines) == sorted(record["job_ids"])


def _reply(state: JobState, job_id: str, attempt: int, **extra: object) -> amqp.Message:
    head = {headers.JOB_ID: job_id, headers.JOB_STATUS: state.status,
            headers.JOB_STATE: state.value, headers.ATTEMPT: attempt, **extra}
    return amqp.Message(b"", application_headers=head, delivery_mode=2)


def test_replies_of_a_stale_attempt_are_dropped_so_a_job_has_one_result(broker_url):
    job_id = uuid.uuid4().hex
    with Client(broker_url) as client, kombu.Connection(broker_url, heartbeat=0) as conn:
        channel = conn.channel()
        for msg in (_reply(JobState.RUNNING, job_id, 1),
                    _reply(JobState.IDLE, job_id, 2, Reason="lease expired on n1"),
                    _reply(JobState.EXITED, job_id, 1, ExitCode=9),  # late, from attempt 1
                    _reply(JobState.RUNNING, job_id, 2),
                    _reply(JobState.EXITED, job_id, 2, ExitCode=0)):
            channel.basic_publish(msg, exchange="", routing_key=client.reply_queue)
        updates = list(client.attach(job_id).updates(timeout_s=10))
    assert [(u.state, u.attempt) for u in updates] == [
        (JobState.RUNNING, 1), (JobState.IDLE, 2), (JobState.RUNNING, 2), (JobState.EXITED, 2)]
    assert updates[-1].exit_code == 0
