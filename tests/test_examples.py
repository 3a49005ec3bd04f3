"""The producers in examples/ send real jobs to a real worker and read the results back."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import kombu
import pytest
from amqp.exceptions import NotFound

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SUBMIT_SH = EXAMPLES / "shell" / "submit.sh"
NODE_DIR = EXAMPLES / "node"
AMQP_TOOLS = ("amqp-declare-queue", "amqp-publish", "amqp-consume", "amqp-delete-queue", "timeout")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def require(present: bool, what: str) -> None:
    """Skip when ``what`` is missing on a developer machine; fail in CI, where it must be there."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and CI must run this test")
    pytest.skip(f"{what} is missing")


def tools_url(broker_url: str) -> str:
    """Return the URL rabbitmq-c accepts: it cannot parse the ``//`` (vhost ``/``) ending."""
    return broker_url.rstrip("/")


def run_shell(broker_url: str, pool: str, cmd: str, arguments: str, result: Path,
              wait_s: int) -> tuple[int, dict[str, str]]:
    require(all(shutil.which(tool) for tool in AMQP_TOOLS), "amqp-tools (amqp-publish...)")
    env = {**os.environ, "RESULT": str(result), "WAIT_S": str(wait_s)}
    proc = subprocess.run(["sh", str(SUBMIT_SH), tools_url(broker_url), pool, cmd, arguments],
                          capture_output=True, text=True, env=env, timeout=wait_s + 20, check=False)
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    lines["replies"] = str(proc.stdout.count("reply=empty"))
    lines["stderr"] = proc.stderr
    return proc.returncode, lines


def run_node(broker_url: str, pool: str, result: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    require(node is not None, "node")
    modules = all((NODE_DIR / "node_modules" / name).is_dir() for name in ("amqplib", "adm-zip"))
    require(modules, "examples/node/node_modules (run `npm ci` there)")
    return subprocess.run([str(node), str(NODE_DIR / "submit.js"), broker_url, pool, str(result)],
                          capture_output=True, text=True, env={**os.environ, "WAIT_S": "40"},
                          timeout=50, check=False)


def read_zip(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as zf:
        return {name: zf.read(name).decode() for name in zf.namelist()}


def queue_exists(conn: kombu.Connection, name: str) -> bool:
    channel = conn.channel()
    try:
        channel.queue_declare(name, passive=True)
    except NotFound:
        return False
    channel.close()
    return True


def test_the_shell_producer_saves_the_zip_of_the_exited_job_and_deletes_its_reply_queue(
        worker, broker_url, pool, tmp_path, amqp):
    result = tmp_path / "result.zip"

    rc, out = run_shell(broker_url, pool, "/bin/echo", "hello 'from the shell'", result, wait_s=30)

    assert rc == 0, out
    # amqp-consume shows bodies only: "Exited" is inferred from the zip body, and the exit code
    # (a header) cannot be seen from the shell at all.
    assert out["state"] == "Exited"
    assert out["job_id"].startswith("sh-")
    # No empty-bodied Running reply came first: the job ended within the node's
    # --running-after, so its Exited reply was its only one.
    assert out["replies"] == "0"
    files = read_zip(result)
    assert files["job.out"] == "hello from the shell\n"
    assert files["job.err"] == ""
    assert not queue_exists(amqp, out["reply_queue"])


def test_the_shell_producer_cannot_tell_a_rejected_job_from_a_running_one_and_times_out(
        worker, broker_url, pool, tmp_path):
    result = tmp_path / "result.zip"

    rc, out = run_shell(broker_url, pool, "/bin/echo", "unbalanced 'quote", result, wait_s=3)

    assert rc == 3, out
    assert out["state"] == "unknown"
    assert out["replies"] == "1"  # the Rejected reply: empty, like a Running one
    assert not result.exists()


def test_the_node_producer_sends_typed_headers_and_an_input_zip_and_gets_the_exited_result(
        worker, broker_url, pool, tmp_path):
    result = tmp_path / "result.zip"

    proc = run_node(broker_url, pool, result)

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["jobId"].startswith("node-")
    assert summary["state"] == "Exited"
    assert summary["exitCode"] == 0
    assert summary["host"]
    assert summary["result"] == str(result)
    assert '"JobState":"Exited"' in proc.stderr  # replies are logged as they come
    assert '"StartedAt":' in proc.stderr
    files = read_zip(result)
    # GREETING came through as a table, the -c script as one array item, input.txt as stdin.
    assert files["job.out"] == "hello from node\nDISPATCH FROM NODE\n"
    assert files["input.txt"] == "dispatch from node\n"


def test_the_node_producer_fails_fast_when_no_worker_serves_the_pool(
        workers, broker_url, pool, tmp_path):
    workers.start(pools=(f"{pool}-other",))  # declares the jobs exchange, but not this pool's queue
    result = tmp_path / "result.zip"

    proc = run_node(broker_url, pool, result)

    assert proc.returncode == 1
    assert f"no queue is bound for pool {pool}" in proc.stderr
    assert proc.stdout == ""
    assert not result.exists()
