"""HTCondor's low-latency example works unchanged against a Dispatch worker."""

from __future__ import annotations

import io
import uuid
import zipfile

import pytest

from amqp_helpers import get_messages, headers_of, publish_job

pytestmark = pytest.mark.timeout(60)


def test_the_low_latency_example_topology_and_quoted_headers_work_unchanged(workers, amqp):
    # The example's own set-up: queue "grid" bound to amq.direct with key grid_key, and a
    # result queue bound to amq.direct with my_grid_results_key.
    queue = f"grid-{uuid.uuid4().hex[:6]}"
    key = f"grid_key-{queue}"
    # --running-after 0: every job says Running as it starts, as the example's node does.
    workers.start("--exchange", "amq.direct", "--routing-key", key, "--queue", queue,
                  "--running-after", "0", wait_for=queue)
    results = f"my_grid_results-{uuid.uuid4().hex[:6]}"
    channel = amqp.channel()
    channel.queue_declare(results, durable=False, auto_delete=False)
    channel.queue_bind(results, "amq.direct", routing_key=f"{results}_key")
    channel.close()

    job_id = str(uuid.uuid4())
    publish_job(amqp, key, {
        "Cmd": '"/bin/echo"',
        "Arguments": '"Hello Grid!"',
        "Out": '"job.out"',
        "Err": '"job.err"',
        "Requirements": "TRUE",
    }, exchange="amq.direct", message_id=job_id, reply_to=f"/exchange/amq.direct/{results}_key")

    running, exited = get_messages(amqp, results, 2)
    assert headers_of(running)["JobState"] == '"Running"'
    assert headers_of(running)["JobStatus"] == 2
    final = headers_of(exited)
    # The listener in the example tests exactly this:
    assert final["JobState"] == '"Exited"' and final["JobStatus"] == 4
    assert final["ExitCode"] == 0
    assert final["ExitBySignal"] is False
    assert exited.properties["correlation_id"] == job_id
    with zipfile.ZipFile(io.BytesIO(exited.body)) as zf:
        assert zf.read("job.out") == b"Hello Grid!\n"


def test_a_producer_that_cannot_set_message_id_may_send_jobid(worker, amqp, pool):
    results = f"res-{uuid.uuid4().hex[:6]}"
    channel = amqp.channel()
    channel.queue_declare(results, durable=True, auto_delete=False)
    channel.close()
    publish_job(amqp, pool, {"Cmd": "sleep", "Arguments": "0.2", "JobId": "from-a-header"},
                reply_to=results)
    running, exited = get_messages(amqp, results, 2)
    assert headers_of(running)["JobId"] == headers_of(exited)["JobId"] == "from-a-header"
    assert exited.properties["correlation_id"] == "from-a-header"


def test_a_job_with_no_id_gets_one_assigned_and_reported_in_every_reply(worker, amqp, pool):
    results = f"res-{uuid.uuid4().hex[:6]}"
    channel = amqp.channel()
    channel.queue_declare(results, durable=True, auto_delete=False)
    channel.close()
    publish_job(amqp, pool, {"Cmd": "sleep", "Arguments": "0.2"}, reply_to=results)
    running, exited = get_messages(amqp, results, 2)
    assigned = headers_of(running)["JobId"]
    assert uuid.UUID(assigned)
    assert headers_of(exited)["JobId"] == assigned
