"""fabric against a real sshd: provision copies a payload, runs the bootstrap script, and the
``dispatch worker`` it starts runs a job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openstack_double import OpenStackDouble
from sshd import Sshd, keygen

from dispatch import topology
from dispatch.client import Client
from dispatch.job import JobSpec
from workers.cloud.bootstrap import ENV_NAME, SCRIPT_NAME

from amqp_helpers import wait_for_consumer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ssh_env(cloud_env: dict[str, str], sshd: Sshd, tmp_path: Path,
            workdir_root: Path) -> Iterator[dict[str, str]]:
    payload = tmp_path / "payload"
    (payload / "conf").mkdir(parents=True)
    (payload / "conf" / "site.txt").write_text("site=test\n")
    (payload / "setup.sh").write_text("#!/bin/sh\necho set-up > setup.done\n")
    (payload / "setup.sh").chmod(0o755)
    remote = tmp_path / "remote"
    cloud_env.update({
        "DISPATCH_CLOUD_SSH_KEY": str(sshd.client_key),
        "DISPATCH_CLOUD_SSH_PORT": str(sshd.port),
        "DISPATCH_CLOUD_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
        "DISPATCH_CLOUD_PAYLOAD": str(payload),
        "DISPATCH_CLOUD_REMOTE_DIR": str(remote),
        "DISPATCH_CLOUD_REMOTE_DISPATCH": str(ROOT / ".venv" / "bin" / "dispatch"),
        "DISPATCH_CLOUD_WORKER_ARGS": f"--workdir-root {workdir_root} --slots 1 --kill-grace 1",
    })
    yield cloud_env
    pid_file = remote / "worker.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def provision(env: dict[str, str], pool: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatch", "cloud", "provision", pool],
                          env=env, capture_output=True, text=True, timeout=90, check=False)


def wait_for_worker(broker_url: str, queue: str, remote: Path) -> None:
    try:
        wait_for_consumer(broker_url, queue, timeout_s=30)
    except TimeoutError:
        log = (remote / "worker.log").read_text() if (remote / "worker.log").exists() else ""
        pytest.fail(f"the bootstrapped worker never consumed {queue}: {log[-3000:]}")


def test_provision_bootstraps_over_ssh_and_the_started_worker_runs_a_job(
        cloud_double: OpenStackDouble, ssh_env: dict[str, str], sshd: Sshd, pool: str,
        client: Client, broker_url: str, tmp_path: Path) -> None:
    cloud_double.state.console_output = sshd.console_with_host_keys()
    result = provision(ssh_env, pool)
    assert result.returncode == 0, result.stderr + sshd.log.read_text()
    name = result.stdout.split("\t")[0]
    assert name.startswith(f"dispatch-{pool}-")
    known = (tmp_path / "known_hosts").read_text()
    assert known == f"[127.0.0.1]:{sshd.port} {' '.join(sshd.host_public.split()[:2])}\n"
    remote = tmp_path / "remote"
    assert (remote / "payload" / "conf" / "site.txt").read_text() == "site=test\n"
    assert (remote / "setup.done").read_text() == "set-up\n"  # the payload's hook ran
    assert (remote / SCRIPT_NAME).exists()
    env_file = remote / ENV_NAME
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert env_file.read_text() == f"DISPATCH_BROKER_URL={broker_url}\n"
    assert remote.stat().st_mode & 0o777 == 0o700
    wait_for_worker(broker_url, topology.pool_queue(pool), remote)
    pid = int((remote / "worker.pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert f"--name {name} --pool {pool}" in cmdline
    assert broker_url not in cmdline  # the broker password never rides a command line
    job = client.submit(JobSpec("echo", ("from the cloud",), pool=pool)).wait(timeout_s=30)
    assert job.exit_code == 0
    assert job.host == name


def test_an_unexpected_host_key_stops_the_bootstrap_before_anything_is_copied(
        cloud_double: OpenStackDouble, ssh_env: dict[str, str], sshd: Sshd, pool: str,
        tmp_path: Path) -> None:
    impostor = keygen(tmp_path / "impostor")
    cloud_double.state.console_output = sshd.console_with_host_keys().replace(
        sshd.host_public, impostor)
    result = provision(ssh_env, pool)
    assert result.returncode == 125
    assert "offered a host key that differs from the one in" in result.stderr
    assert not (tmp_path / "remote").exists()
