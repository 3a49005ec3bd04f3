"""A root worker starts its jobs through a helper that already runs as the job account."""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.client import Client
from dispatch.job import JobRequest, JobSpec, JobState
from workers import spawner
from workers.runner import RunAs, Runner
from workers.spawner import Spawner

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="only a root worker switches accounts"),
]

NOBODY = RunAs.lookup("nobody") if os.geteuid() == 0 else None


@pytest.fixture
def helper() -> Iterator[Spawner]:
    assert NOBODY is not None
    s = Spawner(NOBODY)
    yield s
    s.close()


@pytest.fixture
def jobdir(workdir_root: Path) -> Path:
    assert NOBODY is not None
    d = Path(tempfile.mkdtemp(dir=workdir_root))
    os.chown(d, NOBODY.uid, NOBODY.gid)
    return d


def _run(helper: Spawner, jobdir: Path, *argv: str, env: dict[str, str] | None = None,
         ) -> tuple[int, str]:
    out = os.open(jobdir / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = helper.spawn(list(argv), cwd=jobdir, env=env or {"PATH": "/usr/bin:/bin"},
                            stdin=out, stdout=out, stderr=out)
    finally:
        os.close(out)
    try:
        select.select([proc.pidfd], [], [], 30)
        code = proc.poll()
    finally:
        os.close(proc.pidfd)
    assert code is not None
    return code, (jobdir / "out").read_text()


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_the_helper_runs_jobs_as_the_account_in_their_directory_with_their_environment(
        helper, jobdir):
    code, out = _run(helper, jobdir, "sh", "-c", 'id -un; id -G; pwd; echo "$GREETING"; exit 3',
                     env={"PATH": "/usr/bin:/bin", "GREETING": "hello world"})
    assert code == 3
    assert out.splitlines() == ["nobody", str(NOBODY.gid), str(jobdir), "hello world"]


def test_a_job_with_a_large_non_ascii_environment_goes_through_the_helper_intact(helper, jobdir):
    # 7 x 117 KiB as UTF-8 (each under the kernel's 128 KiB a string); as \\u escapes,
    # 2.4 MiB: more than a request may carry
    env = {f"BIG{i}": "é" * 60000 for i in range(7)}
    code, out = _run(helper, jobdir, "sh", "-c", 'printf %s "$BIG0$BIG6" | wc -c',
                     env={"PATH": "/usr/bin:/bin", **env})
    assert (code, out.strip()) == (0, "240000")


def test_the_helper_reports_a_job_killed_by_a_signal_as_a_negative_status(helper, jobdir):
    code, _ = _run(helper, jobdir, "sh", "-c", "kill -TERM $$")
    assert code == -signal.SIGTERM


def test_commands_that_cannot_run_as_the_account_raise_the_errors_posix_spawn_gives(
        helper, jobdir, workdir_root):
    out = os.open(jobdir / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    root_only = workdir_root / "root-only.sh"
    root_only.write_text("#!/bin/sh\necho should not run\n")
    root_only.chmod(0o700)  # executable by root, not by the account
    try:
        with pytest.raises(FileNotFoundError):
            helper.spawn(["no-such-command"], cwd=jobdir, env={"PATH": "/usr/bin"},
                         stdin=out, stdout=out, stderr=out)
        with pytest.raises(PermissionError):
            helper.spawn([str(root_only)], cwd=jobdir, env={}, stdin=out, stdout=out,
                         stderr=out)
        with pytest.raises(OSError) as too_big:
            helper.spawn(["true"], cwd=jobdir, env={"BIG": "x" * (2 << 20)}, stdin=out,
                         stdout=out, stderr=out)
        assert too_big.value.errno == errno.EMSGSIZE
    finally:
        os.close(out)
    assert _run(helper, jobdir, "true")[0] == 0  # and the helper carries on


def test_the_helper_holds_no_secret_and_the_account_cannot_look_inside_it(helper, monkeypatch):
    monkeypatch.setenv("DISPATCH_TEST_SECRET", "hunter2")  # set after it started: proves nothing
    status = _proc_status(helper.helper_pid)
    assert status["Uid"].split() == [str(NOBODY.uid)] * 4
    assert status["Groups"].strip() == ""
    assert Path(f"/proc/{helper.helper_pid}/environ").read_bytes() == b""
    peek = subprocess.run(["cat", f"/proc/{helper.helper_pid}/environ"], capture_output=True,
                          user=NOBODY.uid, group=NOBODY.gid, extra_groups=[], check=False)
    assert peek.returncode != 0 and b"Permission denied" in peek.stderr  # not dumpable
    fds = Path(f"/proc/{helper.helper_pid}/fd")
    held = sorted(os.readlink(fd) for fd in fds.iterdir())
    ours = os.readlink("/proc/self/fd/2")  # stderr, shared for its tracebacks
    assert [h for h in held if h.startswith("socket:")] == [held[-1]]  # its one socket
    assert sorted(held[:-1]) == sorted(["/dev/null", "/dev/null", ours,
                                        "anon_inode:[eventpoll]"])


def test_a_helper_started_with_a_secret_in_the_workers_environment_does_not_inherit_it(
        monkeypatch):
    monkeypatch.setenv("DISPATCH_TEST_SECRET", "hunter2")
    s = Spawner(NOBODY)
    try:
        assert Path(f"/proc/{s.helper_pid}/environ").read_bytes() == b""
    finally:
        s.close()


def _request(job_id: str, *argv: str) -> JobRequest:
    return JobRequest(job_id=job_id, spec=JobSpec(argv[0], tuple(argv[1:])), reply_to=None,
                      correlation_id=job_id)


def test_jobs_of_a_helper_that_dies_are_killed_and_the_next_job_gets_a_new_helper(
        workdir_root):
    runner = Runner(workdir_root, NOBODY, kill_grace_s=1)
    try:
        first_helper = runner.helper_pid
        assert first_helper is not None
        job = runner.start(_request("long", "sleep", "30"),
                           runner.prepare(_request("long", "sleep", "30"), b""))
        os.kill(first_helper, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not select.select([job], [], [], 0.1)[0]:  # the node's loop, in short
            runner.check_spawner()
            assert time.monotonic() < deadline, "the orphaned job was not killed"
        outcome = job.poll()
        assert outcome is not None and outcome.exit_signal == signal.SIGKILL
        assert runner.helper_pid is None
        job.close()
        request = _request("next", "id", "-un")
        nxt = runner.start(request, runner.prepare(request, b""))
        select.select([nxt], [], [], 10)
        assert nxt.poll().exit_code == 0
        assert (nxt.workdir / "job.out").read_text() == "nobody\n"
        assert runner.helper_pid not in (None, first_helper)
        nxt.close()
    finally:
        runner.close()


def test_when_no_helper_can_start_the_runner_forks_jobs_as_the_account(workdir_root,
                                                                        monkeypatch, caplog):
    monkeypatch.setattr(spawner, "helper_command", lambda code: ["/bin/false"])
    runner = Runner(workdir_root, NOBODY)
    try:
        assert runner.helper_pid is None
        assert "jobs are forked from the worker instead" in caplog.text
        request = _request("forked", "id", "-un")
        job = runner.start(request, runner.prepare(request, b""))
        select.select([job], [], [], 10)
        assert job.poll().exit_code == 0
        assert (job.workdir / "job.out").read_text() == "nobody\n"
        job.close()
    finally:
        runner.close()


def test_closing_the_runner_stops_its_helper(tmp_path):
    runner = Runner(tmp_path / "work", NOBODY)
    pid = runner.helper_pid
    assert pid is not None
    runner.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_root_worker_starts_each_job_from_its_helper_running_as_the_account(
        worker, client: Client, pool, tmp_path):
    spec = JobSpec("sh", ("-c", 'grep -E "^(Name|Uid):" /proc/$PPID/status; '
                                'tr "\\0" " " < /proc/$PPID/cmdline'), pool=pool)
    result = client.submit(spec).wait(timeout_s=30)
    result.extract(tmp_path)
    out = (tmp_path / "job.out").read_text()
    assert f"Uid:\t{NOBODY.uid}\t{NOBODY.uid}\t{NOBODY.uid}\t{NOBODY.uid}" in out
    assert "from workers.spawner import serve" in out


def _helper_of(worker_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            if ppid == worker_pid and b"workers.spawner" in cmdline:
                return int(entry.name)
    raise LookupError(f"worker {worker_pid} has no job spawner")


def test_a_worker_whose_helper_dies_reports_its_job_killed_and_runs_the_next(
        worker, client: Client, pool, tmp_path):
    handle = client.submit(JobSpec("sleep", ("30",), pool=pool))
    assert next(iter(handle.updates(timeout_s=30))).state is JobState.RUNNING
    os.kill(_helper_of(worker.pid), signal.SIGKILL)
    result = handle.wait(timeout_s=30)
    assert (result.state, result.exit_signal) == (JobState.EXITED, signal.SIGKILL)
    again = client.submit(JobSpec("id", ("-un",), pool=pool)).wait(timeout_s=30)
    assert again.exit_code == 0
    again.extract(tmp_path)
    assert (tmp_path / "job.out").read_text() == "nobody\n"
    assert _helper_of(worker.pid)  # a new one


def test_a_job_the_worker_has_no_descriptor_left_to_watch_is_killed_not_left_unseen(
        helper, jobdir):
    out = os.open(jobdir / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor
    try:
        with pytest.raises(OSError) as no_fd:
            helper.spawn(["sh", "-c", "echo started >> marker; sleep 30"], cwd=jobdir,
                         env={"PATH": "/usr/bin:/bin"}, stdin=out, stdout=out, stderr=out)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(out)
    assert no_fd.value.errno == errno.EMFILE
    children = Path(f"/proc/{helper.helper_pid}/task/{helper.helper_pid}/children")
    deadline = time.monotonic() + 10
    while children.read_text().strip():  # the helper reaps it once it is killed
        assert time.monotonic() < deadline, "the job nobody can watch is still running"
        time.sleep(0.05)
    assert helper.check()
    assert _run(helper, jobdir, "true")[0] == 0


def _running_in(directory: Path) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.readlink(f"/proc/{name}/cwd") == str(directory):
                found.append(int(name))
        except OSError:
            continue
    return found


def test_processes_in_a_job_directory_are_killed_and_others_are_not(jobdir, tmp_path):
    inside = subprocess.Popen(["sleep", "30"], cwd=jobdir, start_new_session=True)
    outside = subprocess.Popen(["sleep", "30"], cwd=tmp_path, start_new_session=True)
    try:
        assert spawner.kill_processes_in(jobdir) == [inside.pid]
        assert inside.wait(timeout=10) == -signal.SIGKILL
        assert outside.poll() is None
    finally:
        outside.kill()
        outside.wait()


def test_a_helper_that_starts_a_job_and_stops_answering_leaves_no_second_run(
        workdir_root, monkeypatch, caplog):
    # Helpers that start the job, then hang instead of saying so: each is killed with
    # what it started, and the job ends up started once (by fork, after two helpers).
    root = str(Path(spawner.__file__).resolve().parent.parent)
    hang = (f"import sys, time; sys.path.insert(0, {root!r}); import workers.spawner as s; "
            "real = s._send; s._send = lambda sock, m, fd=None: "
            "time.sleep(3600) if m.get('op') == 'spawned' else real(sock, m, fd); ")
    monkeypatch.setattr(spawner, "helper_command", lambda code: [sys.executable, "-c",
                                                                   hang + code])
    monkeypatch.setattr(spawner, "ANSWER_TIMEOUT_S", 1.0)
    runner = Runner(workdir_root, NOBODY, kill_grace_s=1)
    job = None
    try:
        request = _request("hung", "sleep", "30")
        job = runner.start(request, runner.prepare(request, b""))
        assert job.proc.pid and _running_in(job.workdir) == [job.proc.pid]
        assert caplog.text.count("job spawner stopped answering after starting") == 2
    finally:
        if job is not None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            select.select([job], [], [], 10)
            job.poll()
            job.close()
        runner.close()
