"""The dispatch command as users type it: real processes, real broker, real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import pytest

from dispatch.cli import VERBS, cli

pytestmark = pytest.mark.timeout(120)


def test_submit_wait_runs_a_command_and_unpacks_its_results(worker, pool, dispatch_cli, tmp_path):
    run = dispatch_cli("submit", "--pool", pool, "--wait", "--", "echo", "hi")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert (tmp_path / "dispatch-results" / job_id / "job.out").read_text() == "hi\n"
    assert "Exited" in run.stderr


def test_submit_wait_exits_with_the_jobs_exit_code(worker, pool, dispatch_cli):
    run = dispatch_cli("submit", "--pool", pool, "--wait", "-c", "echo bye; exit 4")
    assert run.returncode == 4


def test_a_yaml_job_file_with_inputs_and_requirements_runs(worker, pool, dispatch_cli, tmp_path):
    (tmp_path / "data.txt").write_text("b\na\n")
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(f"""\
        name: sorter
        command: [sort, data.txt]
        inputs: [data.txt]
        environment: {{MODE: fast}}
        requirements: {{cpus: 1, memory: 64M, time_limit: 1m}}
        priority: high
        pool: {pool}
        """))
    run = dispatch_cli("submit", str(job), "--wait", "--json", "--out", str(tmp_path / "res"))
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["state"] == "Exited" and record["exit_code"] == 0
    assert (tmp_path / "res" / record["job_id"] / "job.out").read_text() == "a\nb\n"


def test_a_json_job_file_works_too(worker, pool, dispatch_cli, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"command": "echo from json", "pool": pool}))
    run = dispatch_cli("submit", str(job), "--wait")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(("content", "field"), [
    ("command: [/bin/true]\nmemroy: 2G\n", "memroy"),
    ("command: /bin/true\nrequirements: {memory: lots}\n", "requirements.memory"),
    ("command: /bin/true\nrequirements: {time_limit: soon}\n", "requirements.time_limit"),
    ("command: /bin/true\npriority: urgent\n", "priority"),
    ("arguments: [a]\n", "command"),
    ("command: /bin/true\ninputs: [missing.txt]\n", "inputs"),
    ("command: [true\n", "YAML"),
    ("command: /bin/true\narray: 0\n", "array"),
    ("command: /bin/true\nnotify: {email: not-an-address}\n", "notify.email"),
    ("command: /bin/true\nnotify: {url: ftp://x, when: sometimes}\n", "notify"),
])
def test_a_bad_job_file_gets_a_one_line_error_naming_the_field(dispatch_cli, tmp_path, content,
                                                               field):
    job = tmp_path / "bad.yaml"
    job.write_text(content)
    run = dispatch_cli("submit", str(job))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert field in lines[0]


def test_requirements_option_overrides_as_in_wq(worker, pool, dispatch_cli):
    run = dispatch_cli("submit", "--pool", pool, "--wait", "-r", "cpus: 64", "--", "true")
    assert run.returncode == 125
    assert "RequestCpus 64" in run.stderr
    bad = dispatch_cli("submit", "--pool", pool, "-r", "cores: 2", "--", "true")
    assert bad.returncode == 2 and "requirements" in bad.stderr


def test_submit_prints_the_id_then_wait_collects_the_result(worker, pool, dispatch_cli, tmp_path):
    submitted = dispatch_cli("submit", "--pool", pool, "--", "/bin/sh", "-c", "exit 3")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = dispatch_cli("wait", job_id)
    assert waited.returncode == 3, waited.stderr
    assert (tmp_path / "dispatch-results" / f"{job_id}.json").exists()
    again = dispatch_cli("wait", job_id)
    assert again.returncode == 3
    assert "already done" in again.stderr


@pytest.mark.parametrize("several", [False, True], ids=["one job", "several jobs"])
def test_a_result_wait_cannot_save_stays_queued_for_the_next_wait(worker, pool, dispatch_cli,
                                                                  tmp_path, several):
    ids = [dispatch_cli("submit", "--pool", pool, "--", "echo", "kept").stdout.strip()
           for _ in range(2 if several else 1)]
    (tmp_path / "a-file").write_text("not a directory\n")
    failed = dispatch_cli("wait", "--out", str(tmp_path / "a-file" / "results"), *ids)
    assert failed.returncode == 125
    [line] = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith("dispatch: error: cannot save a result in ")
    assert "stays on the reply queue" in line and "Traceback" not in failed.stderr
    # The reply was never acked: the next wait, with somewhere to save, gets every result.
    waited = dispatch_cli("wait", "--out", str(tmp_path / "saved"), *ids)
    assert waited.returncode == 0, waited.stderr
    for job_id in ids:
        assert (tmp_path / "saved" / job_id / "job.out").read_text() == "kept\n"


def test_wait_for_several_jobs_shows_progress_and_exits_nonzero_if_one_failed(
        worker, pool, dispatch_cli):
    ids = [dispatch_cli("submit", "--pool", pool, "-c", f"exit {n}").stdout.strip()
           for n in (0, 0, 1)]
    run = dispatch_cli("wait", *ids)
    assert run.returncode == 1
    assert "3/3" in run.stderr


def test_listen_prints_every_update_and_saves_results(worker, pool, dispatch_cli, tmp_path):
    # Each runs longer than the node's --running-after (0.05 s): it says Running too.
    ids = [dispatch_cli("submit", "--pool", pool, "-c", f"sleep 0.2; echo {n}").stdout.strip()
           for n in range(3)]
    run = dispatch_cli("listen", "--until-idle", "--idle-s", "3")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for job_id in ids:
        assert any(job_id in line and "Running" in line for line in lines)
        assert any(job_id in line and "Exited" in line for line in lines)
        assert (tmp_path / "dispatch-results" / job_id / "job.out").exists()


def test_listen_json_prints_one_object_per_update(worker, pool, dispatch_cli):
    short = dispatch_cli("submit", "--pool", pool, "--", "true").stdout.strip()
    long = dispatch_cli("submit", "--pool", pool, "--", "sleep", "0.2").stdout.strip()
    run = dispatch_cli("listen", "--until-idle", "--idle-s", "3", "--json")
    records = [json.loads(line) for line in run.stdout.splitlines()]
    # A job shorter than the node's --running-after gets no Running reply.
    assert [r["state"] for r in records if r["job_id"] == short] == ["Exited"]
    assert [r["state"] for r in records if r["job_id"] == long] == ["Running", "Exited"]


def test_an_unknown_pool_is_a_one_line_error(dispatch_cli):
    run = dispatch_cli("submit", "--pool", "no-such-pool-here", "--", "true")
    assert run.returncode == 125
    assert run.stderr.strip().count("\n") == 0
    assert "no pool 'no-such-pool-here'" in run.stderr


def test_an_unreachable_broker_is_a_one_line_error(dispatch_cli):
    run = dispatch_cli("submit", "--broker", "amqp://guest:secret@127.0.0.1:1//", "--", "true")
    assert run.returncode == 125
    assert "cannot reach broker" in run.stderr
    assert "secret" not in run.stderr


def test_the_worker_command_is_available_and_documented(dispatch_cli):
    run = dispatch_cli("worker", "--help")
    assert run.returncode == 0
    for option in ("--pool", "--slots", "--exchange", "--routing-key", "--queue",
                   "--workdir-root", "--user"):
        assert option in run.stdout


def test_the_worker_describes_the_machine_requirements_are_matched_against(dispatch_cli):
    run = dispatch_cli("worker", "--describe", "--slots", "3", "--memory", "2G",
                       "--group", "gpu", "--group", "ssd", "--name", "node-7")
    assert run.returncode == 0, run.stderr
    attrs = json.loads(run.stdout)
    assert attrs["Cpus"] == 3 and attrs["Memory"] == 2048
    assert attrs["Machine"] == "node-7" and attrs["Groups"] == "gpu,ssd"
    assert {"Arch", "OpSys", "Disk"} <= set(attrs)


@pytest.mark.parametrize("verb", ["submit", "wait", "listen", "rm", "worker"])
def test_a_verb_loads_only_what_it_needs(verb):
    # Each verb's module is imported when it runs: submitting a job or starting a worker
    # must not pay for the ledger's SQLAlchemy, the cloud plane or jsonschema (a
    # smaller worker also forks its jobs faster when it switches users).
    probe = (
        "import sys, click\n"
        "from dispatch.cli import cli\n"
        f"assert cli.get_command(click.Context(cli), {verb!r}) is not None\n"
        "heavy = ('sqlalchemy', 'jsonschema', 'celery', 'openstack', 'fabric', 'paramiko')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_every_verb_is_listed_and_loads():
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert set(VERBS) | {"worker", "cloud", "flower-feed"} <= set(names)
    for name in names:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command), name
    assert cli.get_command(ctx, "no-such-verb") is None
