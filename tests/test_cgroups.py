"""Resources are enforced, not only accounted: each job runs in its own cgroups.

Real workers, real broker, real processes. These tests need writable cgroups (root on a
cgroup v2 or hybrid v1 machine, as here and in CI): without them they fail, unless
``DISPATCH_TEST_NO_CGROUPS=1`` says the machine has none, and then they skip, saying so.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.job import JobSpec, JobState, Resources
from workers.cgroups import CgroupError, Cgroups, Limits
from workers.spawn import spawn

from conftest import Workers

pytestmark = pytest.mark.timeout(120)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2 = {"memory", "pids"} <= set((CGROUP_ROOT / "cgroup.controllers").read_text().split()) \
    if (CGROUP_ROOT / "cgroup.controllers").exists() else False


@pytest.fixture(autouse=True)
def writable_cgroups() -> None:
    """Fail, never skip quietly, where cgroups are expected to be writable."""
    if os.environ.get("DISPATCH_TEST_NO_CGROUPS") == "1":
        pytest.skip("DISPATCH_TEST_NO_CGROUPS=1: this machine cannot make cgroups")
    probe = Cgroups.detect(CGROUP_ROOT, f"probe-{uuid.uuid4().hex[:8]}")
    for h in probe.hierarchies:
        os.rmdir(h.node_dir)


def _node(workers: Workers, pool: str, *args: str) -> str:
    name = f"cg-{uuid.uuid4().hex[:8]}"
    workers.start("--name", name, *args, pools=(pool,))
    return name


def _job_dirs(node: str) -> list[str]:
    """Return the job cgroups under the node's directory in every hierarchy, but the spare."""
    bases = [CGROUP_ROOT / "dispatch" / node] if V2 else [
        CGROUP_ROOT / c / "dispatch" / node for c in ("memory", "pids", "cpu", "unified")]
    return [str(d) for base in bases if base.is_dir() for d in base.iterdir()
            if d.is_dir() and not d.name.startswith("next.")]  # the next job's, made ahead


def _gone(pid: int) -> bool:
    """Tell whether ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait until ``check()`` holds, failing with ``what`` after a generous bound."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_job_over_its_memory_is_killed_with_the_reason_and_the_node_runs_the_next(
        workers, client, pool):
    node = _node(workers, pool)
    hog = JobSpec("/bin/sh", ("-c", "head -c 134217728 /dev/zero | tail > /dev/null"),
                  pool=pool, resources=Resources(memory_mb=64))
    result = client.submit(hog).wait(timeout_s=60)
    assert result.state is JobState.EXITED
    assert not result.ok
    assert result.reason == ("exceeded RequestMemory (64 MiB): "
                             "killed by the out-of-memory killer")
    after = client.submit(JobSpec("echo", ("still here",), pool=pool)).wait(timeout_s=30)
    assert after.ok and after.reason is None
    _eventually(lambda: not _job_dirs(node), "the jobs' cgroups are removed")


def test_the_job_reads_its_cpu_quota_memory_and_process_limits_from_its_own_cgroup(
        workers, client, pool, monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCH_JOB_PIDS_MAX", "50")
    _node(workers, pool)
    if V2:
        script = ('p=$(sed -n "s/^0:://p" /proc/self/cgroup); '
                  'cat /sys/fs/cgroup$p/cpu.max /sys/fs/cgroup$p/memory.max '
                  '/sys/fs/cgroup$p/pids.max')
        expected = ["200000 100000", str(96 << 20), "50"]
    else:
        script = ('at() { sed -n "s/^[0-9]*:$1:\\(.*\\)/\\1/p" /proc/self/cgroup; }; '
                  'cat /sys/fs/cgroup/cpu$(at cpu)/cpu.cfs_quota_us '
                  '/sys/fs/cgroup/cpu$(at cpu)/cpu.cfs_period_us '
                  '/sys/fs/cgroup/memory$(at memory)/memory.limit_in_bytes '
                  '/sys/fs/cgroup/pids$(at pids)/pids.max')
        expected = ["200000", "100000", str(96 << 20), "50"]
    spec = JobSpec("/bin/sh", ("-c", script), pool=pool,
                   resources=Resources(cpus=2, memory_mb=96))
    result = client.submit(spec).wait(timeout_s=30)
    result.extract(tmp_path)
    assert result.ok, (tmp_path / "job.err").read_text()
    assert (tmp_path / "job.out").read_text().split("\n")[:-1] == expected


def test_a_fork_bomb_is_capped_by_the_process_limit_and_cleaned_up(
        workers, client, pool, monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCH_JOB_PIDS_MAX", "20")
    node = _node(workers, pool)
    bomb = ('i=0; while [ $i -lt 200 ]; do sleep 1000 & echo $! >> pids; i=$((i+1)); done; '
            'wait')
    result = client.submit(JobSpec("/bin/sh", ("-c", bomb), pool=pool)).wait(timeout_s=60)
    result.extract(tmp_path)
    started = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert result.state is JobState.EXITED
    assert len(started) < 20, "no more processes than the limit"
    assert result.reason is not None
    assert result.reason.startswith("reached the limit of 20 processes: ")
    assert result.reason.endswith(" forks refused")
    _eventually(lambda: all(_gone(p) for p in started), "every sleeper is killed")
    _eventually(lambda: not _job_dirs(node), "the job's cgroups are removed")


@pytest.mark.parametrize("path", ["spawner helper", "fork of the worker"])
def test_a_daemon_the_job_leaves_behind_is_killed_when_the_job_ends(
        workers, client, pool, tmp_path, path):
    node = _node(workers, pool, *(("--user", "") if path == "fork of the worker" else ()))
    daemon = ("(setsid sh -c 'echo $$ > daemon.pid; exec sleep 1000' &); "
              "while [ ! -s daemon.pid ]; do sleep 0.01; done")
    result = client.submit(JobSpec("/bin/sh", ("-c", daemon), pool=pool)).wait(timeout_s=30)
    assert result.ok
    assert result.reason is None
    result.extract(tmp_path)
    pid = int((tmp_path / "daemon.pid").read_text())
    _eventually(lambda: _gone(pid), "the double-forked daemon is killed")
    _eventually(lambda: not _job_dirs(node), "the job's cgroups are removed")


def test_a_job_over_its_disk_request_says_so_in_its_reply(workers, client, pool):
    _node(workers, pool)
    spec = JobSpec("/bin/sh", ("-c", "head -c 3145728 /dev/urandom > big"), pool=pool,
                   resources=Resources(disk_mb=1))
    result = client.submit(spec).wait(timeout_s=30)
    assert result.state is JobState.EXITED and result.exit_code == 0
    assert result.reason is not None
    assert result.reason.startswith("exceeded RequestDisk (1 MiB): its working directory held 3.")


def test_a_node_without_writable_cgroups_says_so_once_and_still_runs_jobs(
        workers, client, pool, monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCH_CGROUP_ROOT", str(tmp_path / "no-cgroups"))
    _node(workers, pool)
    for memory_mb in (0, 64):
        spec = JobSpec("echo", ("ran",), pool=pool, resources=Resources(memory_mb=memory_mb))
        assert client.submit(spec).wait(timeout_s=30).ok
    log = workers.log()
    assert log.count("jobs run without cgroups") == 1, log
    assert "no-cgroups" in log


def test_a_root_that_is_not_a_cgroup_is_refused(tmp_path):
    with pytest.raises(CgroupError, match="cannot create cgroups under"):
        Cgroups.detect(tmp_path, "node")


def test_a_process_started_while_holding_the_cgroup_is_born_in_it_and_killed_with_it():
    cgroups = Cgroups.detect(CGROUP_ROOT, f"unit-{uuid.uuid4().hex[:8]}")
    job = cgroups.create("job", Limits(memory_mb=32, cpus=1, pids=8))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with job.holding(None):
            proc = spawn(["/bin/sh", "-c", "sleep 1000 & sleep 1000"], cwd=Path("/"), env={},
                         stdin=null, stdout=null, stderr=null, account=None)
        own = Path("/proc/self/cgroup").read_text()
        assert "/job" not in own, "the spawning thread went back home"
        assert f"/{Path(cgroups.hierarchies[0].node_dir).name}/job" in \
            Path(f"/proc/{proc.pid}/cgroup").read_text()
        job.kill()
        _eventually(lambda: proc.poll() is not None, "the job is killed")
        assert proc.poll() == -9
        assert job.remove()
    finally:
        os.close(null)
        for h in cgroups.hierarchies:
            os.rmdir(h.node_dir)
