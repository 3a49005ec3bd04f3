"""`dispatch demo` runs end to end, with the configured broker or a private one it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dispatch.localbroker import broker_reachable


def _demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatch", "demo", *args], env=env,
                          capture_output=True, text=True, timeout=150, check=False)


def _check_table(out: str) -> None:
    assert "hello from dispatch" in out
    assert "9 words.txt" in out
    assert "RequestCpus 64 exceeds" in out
    assert "Requirements not met" in out
    assert "signal 15" in out
    assert "demo finished; everything it started is stopped" in out


@pytest.mark.timeout(180)
def test_the_demo_uses_the_configured_broker(broker_url, tmp_path):
    env = {**os.environ, "DISPATCH_BROKER_URL": broker_url, "HOME": str(tmp_path)}
    run = _demo(env=env)
    assert run.returncode == 0, run.stderr
    assert "(configured)" in run.stdout
    _check_table(run.stdout)


@pytest.mark.timeout(180)
def test_the_demo_starts_and_stops_a_private_broker_when_asked(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "DISPATCH_"))}
    env["HOME"] = str(tmp_path)
    run = _demo("--private-broker", "--no-install", "--keep", str(tmp_path / "kept"), env=env)
    assert run.returncode == 0, run.stderr
    assert "(private, stopped at the end)" in run.stdout
    _check_table(run.stdout)
    url = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("broker:"))
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert not broker_reachable(f"amqp://guest:guest@127.0.0.1:{port}//")
    assert any((tmp_path / "kept").iterdir())
