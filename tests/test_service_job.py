"""Service as a job (HTCondor's seed scenario): a job serves on an ephemeral port, says where
with chirp, a client uses it, and ``dispatch rm`` stops it with its KillSig."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.client import Client
from dispatch.job import JobSpec, JobState

from conftest import ROOT, Workers

pytestmark = pytest.mark.timeout(120)

SERVER = """
import socket, subprocess
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
endpoint = "127.0.0.1:%d" % s.getsockname()[1]
subprocess.run(["/usr/bin/python3", "-m", "dispatch.chirp", "set", "QpiddEndpoint", endpoint],
               check=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"hello from the service\\n")
    conn.close()
"""


def _cli(url: str, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISPATCH_BROKER_URL": url, "DISPATCH_LEDGER_URL": db_url}
    return subprocess.run([sys.executable, "-m", "dispatch", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False, cwd=ROOT)


def test_a_service_job_advertises_its_endpoint_and_rm_stops_it(ledger_service, vhost_url,
                                                               workdir_root: Path,
                                                               tmp_path: Path, pool):
    ledger_service.start("--pool", pool)
    workers = Workers(vhost_url, workdir_root, tmp_path)
    workers.start("--heartbeat-interval", "0.5", pools=(pool,))
    try:
        with Client(vhost_url) as client:
            handle = client.submit(JobSpec("/usr/bin/python3", ("-c", SERVER), pool=pool,
                                           environment={"PYTHONPATH": str(ROOT)}))
            chirp = next(u for u in handle.updates(timeout_s=30) if u.headers.get("Attribute"))
            endpoint = str(chirp.headers["QpiddEndpoint"])
            host, port = endpoint.split(":")
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                assert conn.makefile().readline() == "hello from the service\n"

            ledger_service.wait_for(lambda led: (r := led.job(handle.job_id))
                                    and r.attributes.get("QpiddEndpoint") == endpoint)
            shown = _cli(vhost_url, ledger_service.db_url, "q", "--format",
                         "{JobId} {QpiddEndpoint}\n")
            assert f"{handle.job_id} {endpoint}" in shown.stdout.splitlines(), shown.stderr

            removed = _cli(vhost_url, ledger_service.db_url, "rm", handle.job_id,
                           "--reason", "maintenance")
            assert removed.returncode == 0, removed.stderr
            final = list(handle.updates(timeout_s=30))[-1]
        assert final.state is JobState.REMOVED
        assert (final.exit_by_signal, final.exit_signal) == (True, 15)
        assert "maintenance" in (final.reason or "")
    finally:
        workers.stop_all()
