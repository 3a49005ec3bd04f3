"""The test fixtures clean up after a test that fails mid-job."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dispatch.job import JobSpec, JobState

pytestmark = pytest.mark.timeout(60)


def _jobs_in(root: str, worker_pid: int) -> list[int]:
    tag = f".{worker_pid:x}-"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if cwd.startswith(f"{root}/") and tag in cwd:
            found.append(int(name))
    return found


def test_stopping_the_workers_also_ends_the_jobs_a_killed_worker_left_running(
        workers, client, pool):
    proc = workers.start(pools=(pool,))
    handle = client.submit(JobSpec("sleep", ("300",), pool=pool))
    assert next(handle.updates(timeout_s=30)).state is JobState.RUNNING
    os.kill(proc.pid, signal.SIGKILL)  # as a test that fails mid-job may leave it
    proc.wait(timeout=10)
    left = _jobs_in(str(workers.workdir_root), proc.pid)
    assert left  # the job outlives its worker...
    workers.stop_all()
    deadline = time.monotonic() + 10
    while _jobs_in(str(workers.workdir_root), proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _jobs_in(str(workers.workdir_root), proc.pid) == []  # ...but not the fixture
