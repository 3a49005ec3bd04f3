"""Jobs from a git repository or a directory: fetched, set up, built with cc, output chosen.

Real git (a bare repository over file:// and over ``git daemon`` on loopback), a real cc,
real workers and broker; modules and the thesis's user-input YAML end to end.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dispatch import headers, jobfile
from dispatch.errors import InvalidMessageError
from dispatch.job import Stages
from workers.stages import select_output

from conftest import ROOT, Workers

pytestmark = pytest.mark.timeout(120)

JOB_C = textwrap.dedent("""\
    #include <stdio.h>
    #include <stdlib.h>
    int main(void) {
        const char *who = getenv("WHO");
        FILE *f = fopen("result.txt", "w");
        fprintf(f, "built and run for %s\\n", who ? who : "nobody");
        fclose(f);
        printf("done\\n");
        return 0;
    }
    """)


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org",
                           "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def _job_account() -> tuple[int, int] | None:
    """The uid/gid jobs run as here (a root worker's default --user), None when not root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the job account can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dispatch-repos.", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo(shared_dir: Path) -> dict[str, str]:
    """A bare repository with two commits: tag v1 has job.c, main adds data/ and notes.txt."""
    work = shared_dir / "work"
    work.mkdir()
    _git("init", "-q", cwd=work)
    (work / "job.c").write_text(JOB_C)
    (work / "job").write_text('#!/bin/sh\nprintf "%s\\n" "$key1" > result.txt\necho ran\n')
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "job", cwd=work)
    _git("tag", "v1", cwd=work)
    first = _git("rev-parse", "HEAD", cwd=work)
    (work / "data").mkdir()
    (work / "data" / "a.csv").write_text("1,2\n")
    (work / "notes.txt").write_text("not wanted\n")
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "more", cwd=work)
    bare = shared_dir / "repo.git"
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=shared_dir)
    _give_to_job_account(bare)
    return {"url": f"file://{bare}", "first": first, "bare": str(bare)}


def _give_to_job_account(tree: Path) -> None:
    """Chown a repository to the job account: git refuses one owned by another user."""
    account = _job_account()
    if account is not None:
        for dirpath, _, files in os.walk(tree):
            for name in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                os.chown(name, *account)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def git_daemon(shared_dir: Path, repo: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``git daemon`` on a loopback port serving the bare repository; yields its git:// URL."""
    port = _free_port()
    log = tmp_path / "git-daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["git", "-c", "safe.directory=*", "daemon", "--export-all", "--reuseaddr",
             f"--base-path={shared_dir}", "--listen=127.0.0.1", f"--port={port}",
             "--informative-errors", str(shared_dir)],
            stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"git daemon did not start: {log.read_text()}") from None
            time.sleep(0.05)
    yield f"git://127.0.0.1:{port}/repo.git"
    proc.terminate()
    proc.wait(timeout=10)


def _submit(dispatch_cli, *args: str) -> tuple[dict, subprocess.CompletedProcess[str]]:
    run = dispatch_cli("submit", "--wait", "--json", "--out", "res", *args)
    assert run.stdout.strip(), run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), run


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- git sources ------------------------------------------------------------------------

def test_a_git_job_over_file_url_is_fetched_at_its_tag_built_with_cc_and_returns_its_output(
        worker, pool, dispatch_cli, tmp_path, repo):
    job = tmp_path / "build.yaml"
    job.write_text(textwrap.dedent(f"""\
        source: {repo['url']}
        ref: v1
        setup:
          - cc -o job-bin job.c
          - test ! -e data
        command: ./job-bin
        environment: {{WHO: tests}}
        output: [result.txt]
        pool: {pool}
        """))
    record, run = _submit(dispatch_cli, str(job))
    assert record["state"] == "Exited" and record["exit_code"] == 0, run.stderr
    out = tmp_path / "res" / record["job_id"]
    assert _files(out) == {"result.txt", "job.out", "job.err"}
    assert (out / "result.txt").read_text() == "built and run for tests\n"
    assert (out / "job.out").read_text() == "done\n"
    assert "dispatch: setup 1/2: cc -o job-bin job.c" in (out / "job.err").read_text()


def test_a_git_job_over_git_daemon_at_a_commit_returns_the_whole_directory_but_git(
        worker, pool, dispatch_cli, repo, git_daemon, tmp_path):
    record, run = _submit(dispatch_cli, "--pool", pool, "--source", git_daemon, "--ref",
                          repo["first"], "--setup", "cc -o job-bin job.c", "--", "./job-bin")
    assert record["exit_code"] == 0, run.stderr
    out = tmp_path / "res" / record["job_id"]
    assert _files(out) == {"job.c", "job", "job-bin", "result.txt", "job.out", "job.err"}


def test_output_globs_keep_matching_files_and_whole_directories_only(
        worker, pool, dispatch_cli, repo, git_daemon, tmp_path):
    record, run = _submit(dispatch_cli, "--pool", pool, "--source", git_daemon, "--output",
                          "data", "--output", "**/*.txt", "-c", "mkdir -p o/p && : > o/p/x.txt")
    assert record["exit_code"] == 0, run.stderr
    out = tmp_path / "res" / record["job_id"]
    assert _files(out) == {"data/a.csv", "notes.txt", "o/p/x.txt", "job.out", "job.err"}


def test_a_failing_setup_step_ends_the_job_with_its_exit_code_and_says_which(
        worker, pool, dispatch_cli, repo, tmp_path):
    record, _ = _submit(dispatch_cli, "--pool", pool, "--source", repo["url"], "--setup", "true",
                        "--setup", "cc -o job-bin missing.c", "--", "touch", "ran")
    assert record["state"] == "Exited" and record["exit_code"] == 1
    assert record["reason"] == ("setup step 2 of 2 failed with exit code 1: "
                                "cc -o job-bin missing.c")
    assert "ran" not in _files(tmp_path / "res" / record["job_id"])


def test_submit_wait_prints_which_setup_step_failed(worker, pool, dispatch_cli):
    run = dispatch_cli("submit", "--pool", pool, "--wait", "--setup", "exit 3", "--", "true")
    assert run.returncode == 3
    assert "Exited  exit 3" in run.stderr
    assert "setup step 1 of 1 failed with exit code 3: exit 3" in run.stderr


def test_a_repository_that_cannot_be_fetched_is_a_failed_setup_not_a_crash(
        worker, pool, dispatch_cli, repo):
    missing = repo["url"] + "-missing"
    record, _ = _submit(dispatch_cli, "--pool", pool, "--source", missing, "--", "true")
    assert record["exit_code"] == 128
    assert record["reason"] == f"setup failed: fetching {missing} exited with code 128"
    again = _submit(dispatch_cli, "--pool", pool, "--", "true")[0]  # the node serves on
    assert again["exit_code"] == 0


def test_fetching_counts_against_the_time_limit(worker, pool, dispatch_cli, repo):
    record, _ = _submit(dispatch_cli, "--pool", pool, "--source", repo["url"], "--setup",
                        "sleep 30", "-r", "time_limit: 2", "--", "true")
    assert record["exit_by_signal"] and record["duration_s"] < 20


# -- directory sources ------------------------------------------------------------------

def test_a_directory_source_is_shipped_as_the_working_directory_and_built(
        worker, pool, dispatch_cli, tmp_path):
    src = tmp_path / "mydir"
    (src / "lib").mkdir(parents=True)
    (src / "job.c").write_text(JOB_C)
    (src / "lib" / "keep.txt").write_text("x\n")
    job = tmp_path / "dir.yaml"
    job.write_text(textwrap.dedent(f"""\
        source: ./mydir
        setup: cc -o job job.c
        execution: [./job, test -f lib/keep.txt]
        output: [result.txt]
        pool: {pool}
        """))
    record, run = _submit(dispatch_cli, str(job))
    assert record["exit_code"] == 0, run.stderr
    assert (tmp_path / "res" / record["job_id"] / "result.txt").read_text() == (
        "built and run for nobody\n")


# -- modules ----------------------------------------------------------------------------

@pytest.fixture
def modules_dir(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two modules an operator installed; workers started after this fixture find them."""
    path = shared_dir / "modules"
    path.mkdir()
    hello = path / "hello"
    hello.write_text('#!/bin/sh\necho "hello $1 from $(pwd | sed s,.*/,,)"\n'
                     'echo "exit code was ${DISPATCH_EXIT_CODE:-none}"\n')
    audit = path / "audit-log"
    audit.write_text('#!/bin/sh\nls job.out >/dev/null && echo "$1: audited"\n')
    for module in (hello, audit):
        module.chmod(0o755)
    monkeypatch.setenv("DISPATCH_MODULES_DIR", str(path))
    return path


def _ledger_cli(db: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISPATCH_LEDGER_URL": db, "DISPATCH_BROKER_URL": url}
    return subprocess.run([sys.executable, "-m", "dispatch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env, check=False)


def test_modules_run_before_and_after_the_job_and_their_output_is_in_its_history(
        modules_dir, vhost_url, ledger_service, workdir_root, tmp_path, pool):
    ledger_service.start("--pool", pool)
    workers = Workers(vhost_url, workdir_root, tmp_path)
    try:
        workers.start(pools=(pool,))
        job = tmp_path / "mod.yaml"
        job.write_text(f"command: [sh, -c, 'exit 3']\nmodules: {{pre: [hello, audit-log], "
                       f"post: [hello]}}\npool: {pool}\n")
        run = _ledger_cli(ledger_service.db_url, vhost_url, "submit", str(job), "--wait",
                          "--json", "--out", str(tmp_path / "res"))
        record = json.loads(run.stdout)
        assert record["exit_code"] == 3, run.stderr
        ledger_service.wait_for(lambda led: (j := led.job(record["job_id"])) and j.finished_at)
        full = _ledger_cli(ledger_service.db_url, vhost_url, "history", record["job_id"],
                           "--full")
        assert full.returncode == 0, full.stderr
        assert "PreModule_hello: exit 0\n    hello pre from" in full.stdout
        assert "PreModule_audit_log: exit 0\n    pre: audited" in full.stdout
        assert "PostModule_hello: exit 0\n    hello post from" in full.stdout
        assert "exit code was 3" in full.stdout
        assert "Exited" in full.stdout
        missing = tmp_path / "missing.yaml"
        missing.write_text(f"command: 'true'\nmodules: [nonesuch]\npool: {pool}\n")
        run = _ledger_cli(ledger_service.db_url, vhost_url, "submit", str(missing), "--wait",
                          "--json")
        rejected = json.loads(run.stdout)
        assert rejected["state"] == "Rejected"
        assert "module 'nonesuch' is not installed" in rejected["reason"]
    finally:
        workers.stop_all()


# -- the thesis's user-input YAML -------------------------------------------------------

def _thesis(pool: str, job: str, **extra: str) -> str:
    text = textwrap.dedent(f"""\
        username: {getpass.getuser()}
        user_mail: johndoe@example.org
        destination_cluster: {pool}
        requirements:
          - "chmod +x job"
        job: {job}
        execution:
          - "srun ./job"
        output:
          - "result.txt"
        resources:
          duration: 10m
          memory_per_thread: 100M
        kwargs:
          key1: value1
        """)
    return text + "".join(f"{k}: {v}\n" for k, v in extra.items())


def test_the_thesis_user_input_yaml_runs_end_to_end(worker, pool, dispatch_cli, tmp_path, repo):
    user_input = tmp_path / "user_input.yml"
    user_input.write_text(_thesis(pool, repo["url"]))
    record, run = _submit(dispatch_cli, str(user_input))
    assert record["state"] == "Exited" and record["exit_code"] == 0, run.stderr
    out = tmp_path / "res" / record["job_id"]
    assert _files(out) == {"result.txt", "job.out", "job.err"}
    assert (out / "result.txt").read_text() == "value1\n"


def test_the_thesis_fields_map_to_limits_pool_notices_environment_and_stages(tmp_path, repo):
    user_input = tmp_path / "user_input.yml"
    user_input.write_text(_thesis("lemaitre3", repo["url"], compilation="gcc -o job job.c"))
    spec = jobfile.spec_from_fields(jobfile.load(user_input), tmp_path)
    sent = headers.encode_request(spec)
    assert (sent["TimeLimit"], sent["RequestMemory"], sent["NotifyUser"]) == (
        600, 100, "johndoe@example.org")
    assert spec.pool == "lemaitre3" and spec.environment == {"key1": "value1"}
    assert (spec.command, spec.arguments) == ("/bin/sh", ("-c", "./job"))
    assert spec.stages == Stages(source=repo["url"], setup=("chmod +x job", "gcc -o job job.c"),
                                 output=("result.txt",))


@pytest.mark.parametrize(("extra", "field"), [
    ({"private_key": "~/.ssh/id"}, "private_key"),
    ({"username": "somebody-else"}, "username"),
    ({"colour": "blue"}, "colour"),
    ({"kwargs": {"2bad": "x"}}, "kwargs.2bad"),
    ({"resources": {"nbr_of_nodes": 4, "distribution": "distributed"}},
     "resources.nbr_of_nodes"),
    ({"resources": {"duration": "soon"}}, "resources.duration"),
    ({"execution": ["srun -n 4 ./job"]}, "execution"),
    ({"job": "./nowhere"}, "job"),
    ({"destination_cluster": "no such/pool"}, "destination_cluster"),
])
def test_a_thesis_field_that_cannot_be_honoured_is_a_one_line_error_naming_it(
        dispatch_cli, tmp_path, extra, field):
    data = {**yaml.safe_load(_thesis("p", "https://example.org/x.git")), **extra}
    path = tmp_path / "user_input.yml"
    path.write_text(yaml.safe_dump(data))
    run = dispatch_cli("submit", str(path))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{field}:" in lines[0], run.stderr


# -- codec and output selection ---------------------------------------------------------

def test_staged_headers_round_trip_and_strings_are_lists_for_string_only_producers():
    typed = {"Cmd": "./job", "SourceUrl": "https://example.org/r.git", "SourceRef": "v1",
             "SetupSteps": ["chmod +x job", "cc -o job job.c"], "TransferOutput": ["out/**"],
             "PreModules": ["audit"], "PostModules": ["audit", "notify"]}
    spec = headers.decode_request({"message_id": "j1"}, typed).spec
    assert headers.encode_request(spec) == typed
    strings = {**typed, "SetupSteps": "chmod +x job\ncc -o job job.c\n",
               "TransferOutput": "out/**", "PostModules": "audit, notify"}
    assert headers.decode_request({"message_id": "j1"}, strings).spec == spec


def _readme_git_job() -> tuple[dict, str]:
    """Return the README's git-job request example and its amqp-publish (bash) block."""
    text = (ROOT / "schemas" / "README.md").read_text(encoding="utf-8")
    section = text.split("## Jobs from a repository\n", 1)[1].split("\n## ", 1)[0]
    typed = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])["message"]
    return typed, section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_readme_string_only_git_job_is_the_typed_one(tmp_path):
    typed, script = _readme_git_job()
    stub = "amqp-publish() { printf '%s\\0' \"$@\"; }\n"
    sent = subprocess.run(["bash", "-c", stub + script], capture_output=True, check=True,
                          timeout=10).stdout.decode().split("\0")
    strings = dict(value.split(": ", 1) for flag, value in itertools.pairwise(sent)
                   if flag == "-H")
    from_strings = headers.decode_request({}, strings)
    from_typed = headers.decode_request(typed["properties"], typed["headers"])
    assert from_strings.spec == from_typed.spec
    assert from_typed.spec.stages.setup[2] == "cc -O2 -o histogram histogram.c"


def test_a_plain_job_has_no_stages():
    assert headers.decode_request({"message_id": "j1"}, {"Cmd": "true"}).spec.stages is None


@pytest.mark.parametrize(("name", "value"), [
    ("SourceUrl", "/srv/repo.git"), ("SourceRef", "--upload-pack=evil"),
    ("TransferOutput", "../etc/passwd"), ("TransferOutput", ["a", "/abs"]),
    ("PreModules", "../bin/sh"), ("SetupSteps", [""]),
])
def test_a_bad_staged_header_is_refused_naming_it(name, value):
    extra = {"SourceUrl": "https://example.org/r.git"} if name == "SourceRef" else {}
    with pytest.raises(InvalidMessageError) as caught:
        headers.decode_request({"message_id": "j1"}, {"Cmd": "true", name: value, **extra})
    assert caught.value.field.split(".")[0] == name


def test_a_ref_without_a_source_is_refused():
    with pytest.raises(InvalidMessageError) as caught:
        headers.decode_request({"message_id": "j1"}, {"Cmd": "true", "SourceRef": "main"})
    assert caught.value.field == "SourceRef"


def test_output_selection_keeps_globs_directories_and_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    root = tmp_path / "w"
    for name in ("a.txt", "b.log", "job.out", "deep/x/y.txt", "deep/z.bin", "res/1", "res/2/3"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "link").symlink_to(outside)
    select_output(root, ["**/*.txt", "res"], keep=["job.out"])
    assert _files(root) == {"a.txt", "job.out", "deep/x/y.txt", "res/1", "res/2/3"}
    assert not (root / "link").exists() and (outside / "precious.txt").exists()


def test_a_git_job_gets_its_submodules_at_the_commits_the_repository_pins(
        worker, pool, dispatch_cli, tmp_path, shared_dir):
    lib = shared_dir / "lib"
    lib.mkdir()
    _git("init", "-q", cwd=lib)
    (lib / "version.txt").write_text("lib v1\n")
    _git("add", ".", cwd=lib)
    _git("commit", "-qm", "v1", cwd=lib)
    pinned = _git("rev-parse", "HEAD", cwd=lib)
    (lib / "version.txt").write_text("lib v2, not pinned\n")
    _git("commit", "-qam", "v2", cwd=lib)
    lib_bare = shared_dir / "lib.git"
    _git("clone", "-q", "--bare", str(lib), str(lib_bare), cwd=shared_dir)
    app = shared_dir / "app"
    app.mkdir()
    _git("init", "-q", cwd=app)
    _git("-c", "protocol.file.allow=always", "submodule", "-q", "add", f"file://{lib_bare}",
         "vendor/lib", cwd=app)
    _git("checkout", "-q", pinned, cwd=app / "vendor" / "lib")
    (app / "run.sh").write_text("cat vendor/lib/version.txt\n")
    _git("add", ".", cwd=app)
    _git("commit", "-qm", "app", cwd=app)
    app_bare = shared_dir / "app.git"
    _git("clone", "-q", "--bare", str(app), str(app_bare), cwd=shared_dir)
    for bare in (lib_bare, app_bare):
        _give_to_job_account(bare)
    record, run = _submit(dispatch_cli, "--pool", pool, "--source", f"file://{app_bare}",
                          "--", "/bin/sh", "run.sh")
    assert record["exit_code"] == 0, run.stderr
    out = tmp_path / "res" / record["job_id"]
    assert (out / "job.out").read_text() == "lib v1\n"
