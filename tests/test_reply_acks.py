"""How the client acks replies: an advisory Running goes with its final, never lost or kept.

Each test runs the taking client in a subprocess and SIGKILLs it, so no ack is sent on
its way out: what a second client with the same id then receives is exactly what the
first left unacked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest

from dispatch.client import ACK_DEFER_S, Client
from dispatch.job import JobSpec, JobState

pytestmark = pytest.mark.timeout(90)

#: Takes the replies of one job as they come, prints each state, then sleeps to be killed.
_TAKER = textwrap.dedent("""
    import sys, time
    from dispatch.client import Client
    url, client_id, job_id, stop_at, pump_s = sys.argv[1:6]
    client = Client(url, client_id=client_id)
    for update in client.attach(job_id).updates(timeout_s=30):
        print(update.state.value, flush=True)
        if update.state.value == stop_at:
            break
    client.next_update([job_id], timeout_s=float(pump_s))  # nothing comes: the loop pumps
    print("done", flush=True)
    time.sleep(60)
""")


def _take_then_die(broker_url: str, client_id: str, job_id: str, stop_at: JobState,
                   pump_s: float) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", _TAKER, broker_url, client_id, job_id,
                             stop_at.value, str(pump_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            if line.strip() == "done":
                break
            lines.append(line.strip())
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    return lines


def _left_for(broker_url: str, client_id: str, job_id: str, timeout_s: float) -> list[JobState]:
    with Client(broker_url, client_id=client_id) as again:
        states = []
        while (update := again.next_update([job_id], timeout_s=timeout_s)) is not None:
            states.append(update.state)
            if update.is_final:
                break
        return states


def test_a_running_reply_is_acked_with_its_final_so_a_killed_client_leaves_nothing(
        worker, broker_url, pool):
    client_id = uuid.uuid4().hex[:16]
    with Client(broker_url, client_id=client_id) as submitter:
        # Long enough for a Running reply (the node's --running-after is 0.05 s), short
        # enough that the final follows within the client's ACK_DEFER_S.
        job_id = submitter.submit(JobSpec("sleep", ("0.2",), pool=pool)).job_id
    # Killed at once after taking the final: no time for a deferred ack on its own.
    taken = _take_then_die(broker_url, client_id, job_id, JobState.EXITED, pump_s=0)
    assert taken == ["Running", "Exited"]
    assert _left_for(broker_url, client_id, job_id, timeout_s=1.0) == []


def test_a_running_reply_with_no_final_soon_is_acked_within_the_defer_time(
        worker, broker_url, pool):
    client_id = uuid.uuid4().hex[:16]
    with Client(broker_url, client_id=client_id) as submitter:
        job_id = submitter.submit(JobSpec("sleep", ("3",), pool=pool)).job_id
    taken = _take_then_die(broker_url, client_id, job_id, JobState.RUNNING,
                           pump_s=ACK_DEFER_S + 0.5)
    assert taken == ["Running"]
    # The Running was acked while the client waited: only the final is left for the next.
    assert _left_for(broker_url, client_id, job_id, timeout_s=30) == [JobState.EXITED]


def test_a_running_reply_taken_but_not_yet_acked_comes_back_after_a_crash(
        worker, broker_url, pool):
    """The other side of the deferral: a reply is acked only once handed out, never before."""
    client_id = uuid.uuid4().hex[:16]
    with Client(broker_url, client_id=client_id) as submitter:
        job_id = submitter.submit(JobSpec("sleep", ("3",), pool=pool)).job_id
    taken = _take_then_die(broker_url, client_id, job_id, JobState.RUNNING, pump_s=0)
    assert taken == ["Running"]
    assert _left_for(broker_url, client_id, job_id, timeout_s=30) == [JobState.RUNNING,
                                                                      JobState.EXITED]
