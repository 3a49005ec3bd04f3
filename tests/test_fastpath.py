"""The fast path end to end: real broker, real worker process, real jobs."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from dispatch import submitting
from dispatch.client import Client
from dispatch.errors import ArchiveError, JobTimeoutError, UnroutableError
from dispatch.job import JobSpec, JobState, JobUpdate, Resources
from dispatch.result import JobResult
from workers.runner import MAX_UNTIDY, Runner, remove_tree

from amqp_helpers import dead_letter_of, publish_job

pytestmark = pytest.mark.timeout(90)


def test_an_echo_job_runs_and_its_working_directory_comes_back(worker, client, pool, tmp_path):
    result = client.submit(JobSpec("echo", ("hi", "there"), pool=pool)).wait(timeout_s=30)
    assert result.state is JobState.EXITED
    assert result.exit_code == 0
    assert result.exit_signal is None
    assert result.host
    assert result.duration_s is not None and result.duration_s >= 0
    extracted = result.extract(tmp_path / "out")
    assert sorted(extracted.names) == ["job.err", "job.out"]
    assert (tmp_path / "out" / "job.out").read_text() == "hi there\n"


def test_a_job_that_runs_a_while_says_running_then_exited_with_its_start(worker, client, pool):
    handle = client.submit(JobSpec("sleep", ("0.5",), pool=pool))
    running, final = list(handle.updates(timeout_s=30))
    assert (running.state, final.state) == (JobState.RUNNING, JobState.EXITED)
    assert running.started_at and running.started_at.endswith("+00:00")
    assert final.started_at == running.started_at  # the final reply says it too
    assert running.host == final.host and final.duration_s >= 0.5


def test_a_job_shorter_than_running_after_gets_only_its_final_reply(workers, client, pool):
    """The default --running-after (0.05 s): /bin/true ends long before it, so no Running."""
    first = workers.start(pools=(pool,))
    updates = [list(client.submit(JobSpec("true", pool=pool)).updates(timeout_s=30))
               for _ in range(5)]
    assert [[u.state for u in job] for job in updates] == [[JobState.EXITED]] * 5
    for (final,) in updates:
        assert final.started_at and final.started_at.endswith("+00:00") and final.host
    first.terminate()
    assert first.wait(timeout=20) == 0
    # With --running-after 0 every job says Running as it starts, however short.
    workers.start("--running-after", "0", pools=(pool,))
    running, final = list(client.submit(JobSpec("true", pool=pool)).updates(timeout_s=30))
    assert (running.state, final.state) == (JobState.RUNNING, JobState.EXITED)
    assert running.started_at == final.started_at


def test_a_failing_job_reports_its_exit_code_and_stderr(worker, client, pool, tmp_path):
    spec = JobSpec("/bin/sh", ("-c", "echo oops >&2; exit 3"), pool=pool)
    result = client.submit(spec).wait(timeout_s=30)
    assert (result.state, result.exit_code, result.ok) == (JobState.EXITED, 3, False)
    result.extract(tmp_path)
    assert (tmp_path / "job.err").read_text() == "oops\n"


def test_a_job_killed_by_a_signal_reports_the_signal(worker, client, pool):
    result = client.submit(JobSpec("/bin/sh", ("-c", "kill -KILL $$"), pool=pool)).wait(30)
    assert result.exit_signal == signal.SIGKILL
    assert result.exit_code is None
    assert result.shell_status == 128 + signal.SIGKILL


def test_an_unknown_command_exits_127_with_the_reason_in_stderr(worker, client, pool, tmp_path):
    result = client.submit(JobSpec("no-such-program-xyz", pool=pool)).wait(timeout_s=30)
    assert result.exit_code == 127
    result.extract(tmp_path)
    assert "no-such-program-xyz" in (tmp_path / "job.err").read_text()


@pytest.fixture
def plain_file():
    """A readable file without execute bits, in a directory every account may enter."""
    where = Path(tempfile.mkdtemp(prefix="dispatch-plain.", dir="/var/tmp"))
    where.chmod(0o755)
    path = where / "notes.txt"
    path.write_text("not a program\n")
    path.chmod(0o644)
    yield str(path)
    shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize(("command", "code", "why"), [
    ("/no/such/program", 127, "No such file or directory"),
    ("PLAIN", 126, "Permission denied"),  # not executable
    ("/usr", 126, "Permission denied"),  # a directory
])
def test_a_named_file_that_cannot_run_exits_126_or_127_saying_why(worker, client, pool, tmp_path,
                                                                   plain_file, command, code, why):
    command = plain_file if command == "PLAIN" else command
    result = client.submit(JobSpec(command, pool=pool)).wait(timeout_s=30)
    assert result.exit_code == code
    result.extract(tmp_path)
    err = (tmp_path / "job.err").read_text()
    assert command in err and why in err


def test_the_time_limit_kills_the_whole_process_tree(worker, client, pool, tmp_path):
    # The job starts a grandchild in a new session (out of the job's process group),
    # then both sleep; the limit must reach both.
    script = "setsid sleep 300 & echo $! > grandchild.pid; sleep 300"
    spec = JobSpec("/bin/sh", ("-c", script), time_limit_s=1, pool=pool)
    result = client.submit(spec).wait(timeout_s=30)
    assert result.state is JobState.EXITED
    assert result.exit_signal == signal.SIGTERM
    result.extract(tmp_path)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_job_ignoring_its_kill_signal_is_killed_after_the_grace_period(worker, client, pool):
    spec = JobSpec("/bin/sh", ("-c", "trap '' TERM; sleep 300"), time_limit_s=1, pool=pool)
    result = client.submit(spec).wait(timeout_s=30)
    assert result.exit_signal == signal.SIGKILL


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_inputs_are_unpacked_and_in_becomes_stdin(worker, client, pool, tmp_path):
    data = tmp_path / "numbers.txt"
    data.write_text("3\n1\n2\n")
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "setting.ini").write_text("x=1\n")
    spec = JobSpec("/bin/sh", ("-c", "sort -n; cat conf/setting.ini"), inputs=(data, folder),
                   stdin="numbers.txt", stdout="sorted.txt", stderr="errors.txt", pool=pool)
    result = client.submit(spec).wait(timeout_s=30)
    assert result.exit_code == 0
    out = tmp_path / "out"
    result.extract(out)
    assert (out / "sorted.txt").read_text() == "1\n2\n3\nx=1\n"
    assert (out / "errors.txt").exists()
    assert (out / "numbers.txt").exists()


def test_the_job_environment_is_its_own_not_the_workers(worker, client, pool, tmp_path):
    os.environ["DISPATCH_TEST_SECRET"] = "must-not-leak"
    try:
        spec = JobSpec("env", environment={"GREETING": "hello world"}, pool=pool)
        result = client.submit(spec).wait(timeout_s=30)
    finally:
        del os.environ["DISPATCH_TEST_SECRET"]
    result.extract(tmp_path)
    env = dict(line.split("=", 1) for line in (tmp_path / "job.out").read_text().splitlines())
    assert env["GREETING"] == "hello world"
    assert env["DISPATCH_JOB_ID"] == result.job_id
    assert env["HOME"] == env["_CONDOR_SCRATCH_DIR"]
    assert "DISPATCH_BROKER_URL" not in env
    assert "DISPATCH_TEST_SECRET" not in env


def test_jobs_run_as_the_unprivileged_user_when_the_worker_is_root(worker, client, pool, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the worker only changes user when it runs as root")
    result = client.submit(JobSpec("id", ("-un",), pool=pool)).wait(timeout_s=30)
    result.extract(tmp_path)
    assert (tmp_path / "job.out").read_text().strip() == "nobody"


def test_submitting_to_a_pool_nobody_serves_is_a_clear_error(client):
    with pytest.raises(UnroutableError, match="no pool 'nobody-serves-this'"):
        client.submit(JobSpec("true", pool="nobody-serves-this"))


def test_submit_many_confirms_jobs_by_window_and_all_of_them_run(worker, client, pool,
                                                                 monkeypatch):
    monkeypatch.setattr(submitting, "WINDOW", 4)  # 10 jobs: windows of 4, 4 and 2
    specs = [JobSpec("sh", ("-c", f"echo {i}"), pool=pool) for i in range(10)]
    handles = client.submit_many(specs)
    assert len({h.job_id for h in handles}) == 10
    outputs = [zipfile.ZipFile(io.BytesIO(h.wait(timeout_s=30).archive)).read("job.out")
               for h in handles]
    assert outputs == [f"{i}\n".encode() for i in range(10)]


def test_submit_many_names_the_pool_nobody_serves(worker, client, pool):
    specs = [JobSpec("true", pool=pool), JobSpec("true", pool="nobody-serves-this-either")]
    with pytest.raises(UnroutableError, match="no pool 'nobody-serves-this-either'"):
        client.submit_many(specs)


def test_wait_gives_up_with_a_timeout_error(worker, client, pool):
    handle = client.submit(JobSpec("sleep", ("1",), pool=pool))  # cannot end within 0.3 s
    with pytest.raises(JobTimeoutError):
        handle.wait(timeout_s=0.3)
    assert handle.wait(timeout_s=30).exit_code == 0


def test_a_client_that_was_away_gets_its_results_when_it_comes_back(worker, broker_url, pool):
    with Client(broker_url) as first:
        client_id = first.client_id
        job_id = first.submit(JobSpec("echo", ("later",), pool=pool)).job_id
    time.sleep(0.5)  # the job finishes while no client is connected
    with Client(broker_url, client_id=client_id) as again:
        result = again.attach(job_id).wait(timeout_s=30)
    assert result.exit_code == 0
    assert result.archive


def test_one_client_is_safe_to_share_between_threads(worker, client, pool):
    codes: dict[int, int | None] = {}

    def run(n: int) -> None:
        spec = JobSpec("/bin/sh", ("-c", f"exit {n}"), pool=pool)
        codes[n] = client.submit(spec).wait(timeout_s=60).exit_code

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=80)
    assert codes == {n: n for n in range(8)}


def _arrivals(client, count: int) -> list[tuple[str, JobState]]:
    """Replies in the order they reached the client's queue (one worker: publish order)."""
    seen = []
    while len(seen) < count:
        update = client.next_update(None, timeout_s=30)
        assert update is not None
        seen.append((update.job_id, update.state))
    return seen


def test_a_job_that_does_not_fit_now_waits_for_a_slot(workers, client, pool):
    workers.start(pools=(pool,), slots=2)
    one = client.submit(JobSpec("sleep", ("0.5",), pool=pool)).job_id
    two = client.submit(JobSpec("true", resources=Resources(cpus=2), pool=pool)).job_id
    # /bin/true ends within the node's --running-after: no Running reply for it.
    assert _arrivals(client, 3) == [(one, JobState.RUNNING), (one, JobState.EXITED),
                                    (two, JobState.EXITED)]


def test_higher_priority_jobs_run_first(workers, client, pool):
    proc = workers.start(pools=(pool,), slots=1)
    proc.terminate()
    proc.wait(timeout=15)
    ids = {p: client.submit(JobSpec("true", priority=p, pool=pool)).job_id for p in (1, 5, 9)}
    workers.start(pools=(pool,), slots=1)
    ended = [job for job, state in _arrivals(client, 3) if state is JobState.EXITED]
    assert ended == [ids[9], ids[5], ids[1]]  # one slot: each ends before the next starts


def test_sigterm_lets_running_jobs_finish_and_stops_taking_new_ones(workers, client, pool):
    proc = workers.start(pools=(pool,), slots=1)
    running = client.submit(JobSpec("sleep", ("1",), pool=pool))
    next(running.updates(timeout_s=30))  # it is running
    queued = client.submit(JobSpec("true", pool=pool))
    proc.send_signal(signal.SIGTERM)
    assert running.wait(timeout_s=30).exit_code == 0
    assert proc.wait(timeout=30) == 0
    with pytest.raises(JobTimeoutError):
        queued.wait(timeout_s=0.5)  # still queued, not lost: a new worker runs it
    workers.start(pools=(pool,), slots=1)
    assert queued.wait(timeout_s=30).exit_code == 0


def test_a_worker_in_burst_mode_exits_once_its_queue_is_empty(workers, client, pool):
    proc = workers.start(pools=(pool,), slots=1)
    proc.terminate()
    proc.wait(timeout=15)
    handles = [client.submit(JobSpec("true", pool=pool)) for _ in range(3)]
    burst = workers.start("--burst", pools=(pool,), slots=1)
    assert burst.wait(timeout=30) == 0
    assert [h.wait(timeout_s=10).exit_code for h in handles] == [0, 0, 0]


def test_finished_jobs_leave_no_working_directories_behind(workers, client, pool):
    root = Path(tempfile.mkdtemp(prefix="dispatch-own-root.", dir="/var/tmp"))
    root.chmod(0o755)  # the unprivileged job account must reach its directories
    try:
        proc = workers.start("--workdir-root", str(root), pools=(pool,))
        scripts = ["mkdir -p a/b && echo x > a/b/f",  # zipped by zipfile, removed by rmtree
                   "echo x > f; ln -s f link; mkfifo p"]  # zipped in one pass, listing reused
        handles = [client.submit(JobSpec("sh", ("-c", scripts[i % 2]), pool=pool))
                   for i in range(20)]
        assert {h.wait(timeout_s=30).exit_code for h in handles} == {0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # What is left is the node's own: its spool and its chirp socket, no job's.
        assert {p.name for p in root.iterdir()} <= {".spool", ".chirp"}, list(root.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_results_are_extracted_safely(tmp_path: Path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../outside.txt", "nope")
    result = JobResult(JobUpdate("j1", JobState.EXITED, exit_code=0, archive=buf.getvalue()))
    with pytest.raises(ArchiveError):
        result.extract(tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_group_labels_steer_jobs_to_nodes_that_have_them(workers, client, pool):
    workers.start("--group", "gpu", "--group", "fast", pools=(pool,))
    ok = client.submit(JobSpec("true", requirements='stringListMember("gpu", Groups)',
                               pool=pool)).wait(timeout_s=30)
    assert ok.state is JobState.EXITED
    refused = client.submit(JobSpec("true", requirements='stringListMember("tpu", Groups)',
                                    pool=pool)).wait(timeout_s=30)
    assert refused.state is JobState.REJECTED
    assert "tpu" in (refused.reason or "")


def test_an_expired_job_is_dead_lettered_by_the_broker_not_run(workers, amqp, pool):
    proc = workers.start(pools=(pool,), slots=1)
    proc.terminate()
    proc.wait(timeout=15)
    publish_job(amqp, pool, {"Cmd": "true"}, message_id="expires-fast", expiration="1")
    dead = dead_letter_of(amqp, "expires-fast")
    deaths = dead.properties["application_headers"]["x-death"]
    assert deaths[0]["reason"] == "expired"


def test_a_busy_node_leaves_queued_jobs_for_other_nodes(workers, client, pool, amqp):
    """Prefetch follows free slots: a node whose one slot is taken takes no more jobs."""
    gate = Path(tempfile.mkdtemp(prefix="dispatch-gate.", dir="/var/tmp"))
    gate.chmod(0o755)  # the job's account waits on it
    try:
        workers.start(pools=(pool,), slots=1)
        # It also ends once the gate is gone, so a failed test leaves no job behind.
        long = client.submit(JobSpec("/bin/sh", ("-c", f"until [ -e {gate}/open ] || "
                                                 f"[ ! -d {gate} ]; do sleep 0.05; done"),
                                     pool=pool))
        first = next(long.updates(timeout_s=30))
        assert first.state is JobState.RUNNING
        quick = [client.submit(JobSpec("true", pool=pool)) for _ in range(2)]
        time.sleep(0.5)  # time enough for a delivery, were one allowed
        _, ready, _ = amqp.default_channel.queue_declare(f"dispatch.pool.{pool}", passive=True)
        assert ready == 2
        workers.start(pools=(pool,), slots=1)
        hosts = {h.wait(timeout_s=30).host for h in quick}
        assert first.host not in hosts and len(hosts) == 1  # the idle node ran both
        (gate / "open").touch()
        assert long.wait(timeout_s=30).exit_code == 0
    finally:
        shutil.rmtree(gate, ignore_errors=True)


def test_a_finished_jobs_directory_goes_once_the_node_is_idle(workers, client, pool):
    root = Path(tempfile.mkdtemp(prefix="dispatch-own-root.", dir="/var/tmp"))
    root.chmod(0o755)  # the unprivileged job account must reach its directories
    try:
        workers.start("--workdir-root", str(root), pools=(pool,))
        result = client.submit(JobSpec("sh", ("-c", "echo x > f"), pool=pool)).wait(
            timeout_s=30)
        assert result.exit_code == 0
        # The node removes it after the reply, when nothing else waits: it is idle now.
        deadline = time.monotonic() + 10
        while [p for p in root.iterdir() if not p.name.startswith(".")]:  # the node's own
            assert time.monotonic() < deadline, list(root.iterdir())
            time.sleep(0.02)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Finished:
    """What Runner.cleanup reads of a finished job: its directory and zip listing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.listing = ("job.out",)
        (workdir / "job.out").write_text("x")

    def release(self) -> None:
        """No cgroups here."""


def test_a_busy_runner_keeps_at_most_max_untidy_directories_and_tidy_removes_them(
        tmp_path: Path):
    runner = Runner(tmp_path / "root", None)
    dirs = [runner._new_workdir(f"job{n}") for n in range(MAX_UNTIDY + 2)]
    for workdir in dirs:
        runner.cleanup(_Finished(workdir))  # type: ignore[arg-type]
    # Never idle in between: beyond MAX_UNTIDY, the oldest went at once.
    assert [d.exists() for d in dirs] == [False, False] + [True] * MAX_UNTIDY
    assert runner.untidy
    runner.tidy()
    assert not runner.untidy and not any(d.exists() for d in dirs)
    last = runner._new_workdir("last")
    runner.cleanup(_Finished(last))  # type: ignore[arg-type]
    runner.close()  # a stopping node leaves none behind
    assert not last.exists()


def test_removing_a_job_directory_copes_with_files_made_after_its_listing(tmp_path: Path):
    for late in ("late-file", "late-dir/inner"):
        job_dir = tmp_path / late.split("/")[0] / "job"
        job_dir.mkdir(parents=True)
        (job_dir / "job.out").write_text("")
        listing = ("job.out", "gone-already")  # what the zip saw, plus a file since removed
        (job_dir / late).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / late).write_text("written after the listing")
        remove_tree(job_dir, listing)
        assert not job_dir.exists()


def test_a_second_node_with_a_name_in_use_is_refused_and_takes_no_job(workers, client, pool):
    name = f"twin-{pool}"
    first = workers.start("--name", name, pools=(pool,))
    # Heartbeats every 0.3 s: a lease, the grace for a previous connection, is 0.9 s.
    twin = workers.start("--name", name, "--heartbeat-interval", "0.3", pools=(pool,),
                         wait_for=f"dispatch.control.{name}")  # held by the first already
    assert twin.wait(timeout=30) == 125  # EXIT_DISPATCH: an error Dispatch reports
    log = workers.log()
    assert f"another node is connected to the broker as '{name}'" in log
    assert "serving" not in log  # it never consumed a pool queue
    result = client.submit(JobSpec("hostname", pool=pool)).wait(timeout_s=30)
    assert result.ok and result.host == name
    # Once the first node is gone, the name is free again.
    first.terminate()
    assert first.wait(timeout=30) == 0
    third = workers.start("--name", name, pools=(pool,))
    assert client.submit(JobSpec("/bin/true", pool=pool)).wait(timeout_s=30).ok
    assert third.poll() is None
