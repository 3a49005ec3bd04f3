"""openstack-queue's users: their JSON job files as they are, qsub/qstat/qdel, and qterm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_ledger import LedgerProcess

from dispatch import headers, jobfile, oqueue
from dispatch.cli.users import permissions
from dispatch.client import Client
from dispatch.job import JobSpec, JobState
from dispatch.ledger import LedgerState

from conftest import Workers

pytestmark = pytest.mark.timeout(120)

#: Seed 000's example, verbatim: Gson-lenient JSON with single quotes.
SEED_EXAMPLE = """{
        'groupName':'hello',
        'minNodes':1,
        'maxNodes':1,
        'minNodeSize':8,
        'logPath':'/somewhere/to/store/server/logs/',
        'resultsPath':'/somewhere/to/copy/results/files/',
        'payloadFiles':['/path/to/compiled/program/a.out'],
        'bootstrapScript':'apt-get -y update && apt-get -y install openmpi-bin',
        'executeScript':'mpirun --hostfile /tmp/hostfile /tmp/a.out',
        'cleanupScript':''
}

"""

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(broker_url: str, tmp_path: Path) -> Run:
    """Run the real ``dispatch`` command (as guest unless ``url`` says otherwise)."""
    def dispatch(*args: str, url: str | None = None,
                 timeout: float = 90) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DISPATCH_BROKER_URL": url or broker_url,
               "DISPATCH_CONFIG_DIR": str(tmp_path / "config")}
        return subprocess.run([sys.executable, "-m", "dispatch", *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              check=False)

    return dispatch


def _job_file(tmp_path: Path, text: str, name: str = "myjob.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- job files ------------------------------------------------------------------------


def test_the_seeds_single_quoted_example_maps_to_a_multi_node_job_file(tmp_path):
    fields = jobfile.load(_job_file(tmp_path, SEED_EXAMPLE))
    assert fields == {
        "name": "hello",
        "nodes": {"min": 1, "max": 1, "min_cpus": 8},
        "inputs": ["/path/to/compiled/program/a.out"],
        "bootstrap": "apt-get -y update && apt-get -y install openmpi-bin",
        "execute": "mpirun --hostfile $DISPATCH_HOSTFILE $DISPATCH_WORKDIR/a.out",
        "log_path": "/somewhere/to/store/server/logs/",
        "results_path": "/somewhere/to/copy/results/files/",
    }  # the empty cleanupScript is no cleanup


def test_the_seeds_example_becomes_the_headers_of_a_multi_node_job(tmp_path):
    payload = tmp_path / "a.out"
    payload.write_bytes(b"\x7fELF")
    text = SEED_EXAMPLE.replace("/path/to/compiled/program/a.out", str(payload))
    spec = jobfile.spec_from_fields(jobfile.load(_job_file(tmp_path, text)), tmp_path)
    assert spec.inputs == (payload,)
    sent = headers.encode_request(spec)
    assert sent == {
        "Cmd": "/bin/sh",
        "Arguments": ["-c", "mpirun --hostfile $DISPATCH_HOSTFILE $DISPATCH_WORKDIR/a.out"],
        "RequestCpus": 8, "JobName": "hello", "MinNodes": 1, "MaxNodes": 1,
        "BootstrapScript": "apt-get -y update && apt-get -y install openmpi-bin",
    }
    assert "somewhere" not in json.dumps(sent)  # logPath and resultsPath stay on the client


def test_strict_json_with_more_nodes_a_cleanup_and_a_walltime_maps_each_field(tmp_path):
    job = {"groupName": "md", "minNodes": 2, "maxNodes": 4, "minNodeSize": 2,
           "payloadFiles": [], "jobMaximumWalltime": 90_500,
           "executeScript": "mpirun -np 8 --hostfile /tmp/hostfile ./md",
           "cleanupScript": "cp *.dat /tmp/copyback/"}
    spec = jobfile.spec_from_fields(jobfile.load(_job_file(tmp_path, json.dumps(job))))
    assert spec.nodes is not None and (spec.nodes.min, spec.nodes.max) == (2, 4)
    assert spec.nodes.cleanup == "cp *.dat $DISPATCH_COPYBACK/"
    assert spec.nodes.bootstrap is None and spec.resources.cpus == 2
    assert spec.time_limit_s == 91  # milliseconds, rounded up to whole seconds


def test_only_openstack_queues_fixed_places_are_rewritten():
    script = ("cat /tmp/hostfile /var/tmp/hostfile /tmp/hostfile2; tar czf /tmp/copyback/x.tgz "
              "/tmp/in.dat /tmp/in.dat.bak; /tmp/a.out")
    assert oqueue.rewrite(script, ["in.dat", "a.out"]) == (
        "cat $DISPATCH_HOSTFILE /var/tmp/hostfile /tmp/hostfile2; tar czf "
        "$DISPATCH_COPYBACK/x.tgz $DISPATCH_WORKDIR/in.dat /tmp/in.dat.bak; "
        "$DISPATCH_WORKDIR/a.out")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("osImageId", "'ubuntu-14.04'", "cloud plane's image"),
    ("defaultLoginUser", "'ubuntu'", "job account"),
    ("securityGroups", "['default']", "not made per job"),
    ("preferredAvailabilityZones", "['melbourne']", "requirements.group"),
    ("queueName", "'fast'", "is not a field of openstack-queue's job format"),
    ("minNodes", "0", "is not a whole number >= 1"),
    ("maxNodes", "'four'", "is not a whole number >= 1"),
    ("payloadFiles", "'/a.out'", "must be a list of file paths"),
    ("executeScript", "''", "is required"),
    ("jobMaximumWalltime", "-5", "is not a number of milliseconds"),
])
def test_a_field_that_cannot_be_honoured_is_a_one_line_error_naming_it(run, tmp_path, field,
                                                                      value, says):
    text = SEED_EXAMPLE.replace("'cleanupScript':''", f"'cleanupScript':'', '{field}':{value}")
    _job_file(tmp_path, text)
    done = run("submit", "myjob.json")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"dispatch: error: {field}: ") and says in line


def test_lenient_job_files_are_parsed_never_evaluated(run, tmp_path):
    marker = tmp_path / "pwned"
    text = ("{'groupName': __import__('os').system('touch " + str(marker) + "'), "
            "'executeScript': 'true'}")
    _job_file(tmp_path, text)
    done = run("submit", "myjob.json")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "not valid JSON" in done.stderr
    assert not marker.exists()
    assert oqueue.lenient("{'minNodes': true and 1}") is None
    assert oqueue.lenient("{'a': [1, -2.5, null, false], 'b': {'c': 'd'}}") == {
        "a": [1, -2.5, None, False], "b": {"c": "d"}}


# -- logPath and resultsPath on the client ----------------------------------------------

#: A job whose result has a multi-node job's layout: logs/<node>.out|.err, copyback/<node>.tar.gz.
_LAYOUT = ("mkdir -p logs copyback data && for n in n1 n2; do "
           "printf '10.0.0.%s\\nout of %s\\n' ${#n} $n > logs/$n.out; "
           "printf '10.0.0.%s\\n' ${#n} > logs/$n.err; echo $n > data/$n.dat; "
           "tar czf copyback/$n.tar.gz data/$n.dat; done")


def test_wait_copies_per_node_logs_and_archives_to_the_job_files_paths(worker, pool, run,
                                                                       tmp_path):
    _job_file(tmp_path, json.dumps({"command": ["/bin/sh", "-c", _LAYOUT], "pool": pool,
                                    "log_path": "server-logs", "results_path": "results"}),
              "job.json")
    submitted = run("submit", "job.json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = run("wait", job_id, "--out", "out")  # another process: the paths were kept
    assert waited.returncode == 0, waited.stderr
    saved = tmp_path / "out" / job_id
    logs, archives = tmp_path / "server-logs" / job_id, tmp_path / "results" / job_id
    assert sorted(p.name for p in logs.iterdir()) == ["n1.err", "n1.out", "n2.err", "n2.out"]
    assert (logs / "n2.out").read_text() == "10.0.0.2\nout of n2\n"
    assert sorted(p.name for p in archives.iterdir()) == ["n1.tar.gz", "n2.tar.gz"]
    assert (archives / "n1.tar.gz").read_bytes() == (saved / "copyback/n1.tar.gz").read_bytes()
    assert f"4 file(s) copied to {logs}" in waited.stderr


# -- qsub, qstat, qdel ------------------------------------------------------------------


@pytest.fixture
def ledger_on_vhost(ledger_service: LedgerProcess, pool: str) -> LedgerProcess:
    return ledger_service.start("--pool", pool)


def test_qsub_qstat_and_qdel_submit_list_and_remove_a_job(ledger_on_vhost, vhost_url,
                                                          workdir_root, tmp_path, pool, run):
    workers = Workers(vhost_url, workdir_root, tmp_path)
    try:
        workers.start(pools=(pool,))
        submitted = run("qsub", "--pool", pool, "--", "sleep", "300", url=vhost_url)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        ledger_on_vhost.wait_for(lambda led: (rec := led.job(job_id)) is not None
                                 and rec.state is LedgerState.RUNNING)
        listed = run("qstat", "--full", "--db", ledger_on_vhost.db_url, url=vhost_url)
        assert listed.returncode == 0, listed.stderr
        (row,) = [line for line in listed.stdout.splitlines() if job_id in line]
        assert "Running" in row and "sleep 300" in row
        removed = run("qdel", job_id, url=vhost_url)
        assert removed.returncode == 0, removed.stderr
        assert f"{job_id}: remove accepted" in removed.stdout
        ledger_on_vhost.wait_for(lambda led: (r := led.job(job_id)) is not None
                                 and r.state is LedgerState.REMOVED)
    finally:
        workers.stop_all()


def test_the_openstack_queue_names_are_listed_in_the_help(run):
    done = run("--help")
    assert done.returncode == 0
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert {"qsub", "qstat", "qdel", "shutdown"} <= listed


# -- shutdown (qterm) -------------------------------------------------------------------


def _running_on(handle: Any) -> str:
    update = next(handle.updates(timeout_s=60))
    assert update.state is JobState.RUNNING
    return str(update.host)


def test_shutdown_of_a_pool_lets_the_running_job_finish_and_stops_only_its_nodes(
        workers, client, pool, run):
    first, second = workers.start(pools=(pool,)), workers.start(pools=(pool,))
    bystander = workers.start(pools=(f"{pool}-other",))
    handle = client.submit(JobSpec("/bin/sh", ("-c", "sleep 2; echo finished"), pool=pool))
    _running_on(handle)
    done = run("shutdown", "--pool", pool, "--expect", "2", "--reason", "maintenance")
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert len(lines) == 2 and all(": shutting down, finishing " in line for line in lines)
    assert sum("finishing 1 running job(s)" in line for line in lines) == 1
    result = handle.wait(timeout_s=60)
    assert result.state is JobState.EXITED and result.exit_code == 0
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert bystander.poll() is None  # it serves another pool
    assert "shut down by guest: maintenance" in workers.log(0)


def test_shutdown_with_requeue_hands_the_running_job_to_another_node(workers, client, pool,
                                                                     run):
    leaving = f"{pool}-leaving"
    first = workers.start(pools=(leaving, pool), slots=1)
    handle = client.submit(JobSpec("/bin/sh", ("-c", "sleep 3; echo $DISPATCH_ATTEMPT"),
                                   pool=pool))
    first_host = _running_on(handle)
    second = workers.start(pools=(pool,), slots=1)
    done = run("shutdown", "--pool", leaving, "--requeue", "--expect", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{first_host}: shutting down, 1 job(s) requeued"
    updates = list(handle.updates(timeout_s=60))
    queued = [u for u in updates if u.state is JobState.IDLE]
    assert queued and "shut down by guest; queued again" in str(queued[0].reason)
    final = updates[-1]
    assert final.state is JobState.EXITED and final.exit_code == 0
    assert final.host not in (None, first_host)
    assert first.wait(timeout=60) == 0
    assert second.poll() is None


@pytest.fixture
def stranger_url(rabbitmq_proc: Any, broker_url: str) -> Iterator[str]:
    """A real broker user with every permission whom no node trusts."""
    name, password = f"stranger-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    rabbitmq_proc.rabbitctl_output("add_user", name, password)
    rabbitmq_proc.rabbitctl_output("set_permissions", "-p", "/", name, ".*", ".*", ".*")
    yield broker_url.replace("guest:guest", f"{name}:{password}")
    rabbitmq_proc.rabbitctl_output("delete_user", name)


def test_a_shutdown_from_a_user_the_nodes_do_not_trust_is_refused_in_one_line(
        worker, client, pool, run, stranger_url):
    done = run("shutdown", "--pool", pool, "--expect", "1", url=stranger_url)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    stranger = stranger_url.split("//")[1].split(":")[0]
    assert line.startswith("dispatch: error: permission denied: ")
    assert f"sender {stranger} is not trusted" in line
    assert worker.poll() is None
    assert client.submit(JobSpec("/bin/true", pool=pool)).wait(timeout_s=60).exit_code == 0


def test_a_shutdown_from_a_user_the_broker_keeps_from_control_is_refused_in_one_line(
        rabbitmq_proc, broker_url, run):
    name, password = f"user-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    rabbitmq_proc.rabbitctl_output("add_user", name, password)
    rabbitmq_proc.rabbitctl_output("set_permissions", "-p", "/", name, *permissions(name))
    try:
        done = run("shutdown", "--all", "--requeue", url=broker_url.replace("guest:guest",
                                                               f"{name}:{password}"))
    finally:
        rabbitmq_proc.rabbitctl_output("delete_user", name)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"dispatch: error: permission denied: shutdown is for admins; the broker does not "
        f"let {name} send control messages"]


def test_a_node_started_after_a_shutdown_was_given_ignores_it(workers, client, pool, run):
    name = f"late-{uuid.uuid4().hex[:6]}"
    workers.start("--name", name, pools=(pool,))
    workers.stop_all()  # its control queue stays, and takes the order while it is away
    done = run("shutdown", "--pool", pool, "--timeout", "2")
    assert done.returncode == 1 and "no node answered" in done.stderr
    again = workers.start("--name", name, pools=(pool,))
    assert client.submit(JobSpec("/bin/true", pool=pool)).wait(timeout_s=60).exit_code == 0
    assert again.poll() is None
    assert "ignoring a shutdown given at" in workers.log()



def test_with_a_ledger_a_requeued_job_goes_out_again_as_its_next_attempt(
        ledger_on_vhost, vhost_url, workdir_root, tmp_path, pool, run):
    workers = Workers(vhost_url, workdir_root, tmp_path)
    leaving = f"{pool}-leaving"
    try:
        first = workers.start(pools=(leaving, pool), slots=1)
        with Client(vhost_url) as client:
            handle = client.submit(JobSpec("/bin/sh", ("-c", "sleep 3; echo $DISPATCH_ATTEMPT"),
                                           pool=pool))
            first_host = _running_on(handle)
            ledger_on_vhost.wait_for(lambda led: (r := led.job(handle.job_id)) is not None
                                     and r.state is LedgerState.RUNNING)  # claimed and acked
            workers.start(pools=(pool,), slots=1)
            done = run("shutdown", "--pool", leaving, "--requeue", "--expect", "1",
                       url=vhost_url)
            assert done.returncode == 0, done.stderr
            result = handle.wait(timeout_s=90)
        assert result.state is JobState.EXITED and result.exit_code == 0
        assert result.host != first_host and result.update.attempt == 2
        assert first.wait(timeout=60) == 0
    finally:
        workers.stop_all()
