"""The benchmark runs end to end (tiny sizes) and its CPU meters read real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cpu

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(240)


def test_the_listener_of_a_port_is_found_and_a_free_port_has_none():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert cpu.listener_pid(port) == os.getpid()
    assert cpu.listener_pid(port) is None


def test_a_worker_tree_counts_its_live_children_and_the_jobs_they_reaped():
    # A parent whose child burns CPU in a grandchild it reaps, then stays alive.
    script = ("import subprocess, sys, time;"
              "subprocess.run([sys.executable, '-c', 'x = 0\\nwhile x < 10_000_000: x += 1']);"
              "print('done', flush=True); time.sleep(30)")
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {script!r}])"
    with subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                          start_new_session=True) as parent:
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline() == b"done\n"
            time.sleep(0.1)
            spent = cpu.tree_cpu_s(parent.pid)
            assert spent >= 0.05  # the counting loop ran two levels below the root
            assert cpu.tree_cpu_s(parent.pid) >= spent
        finally:
            os.killpg(parent.pid, signal.SIGKILL)  # the sleeping child too


def test_per_job_figures_divide_the_difference_and_keep_unknowns_unknown():
    before = cpu.Reading(broker_s=None, worker_s=1.0, client_s=2.0)
    after = cpu.Reading(broker_s=None, worker_s=3.0, client_s=2.5)
    assert cpu.per_job_ms(before, after, 1000) == {"broker": None, "worker": 2.0, "client": 0.5}


def test_the_bench_measures_dispatch_celery_and_the_floor_and_writes_its_run(broker_url,
                                                                            tmp_path):
    env = {**os.environ, "DISPATCH_BROKER_URL": broker_url}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--latency-jobs", "20", "--warmup", "3",
         "--throughput-jobs", "40", "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| latency p50 (ms), 1 in flight" in run.stdout
    assert "CPU ms/job, broker" in run.stdout
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    for phase in (result["dispatch"]["throughput_2slot"], result["celery"]["throughput"]):
        assert phase["jobs"] == 40 and phase["jobs_per_s"] > 0
        _assert_cpu_measured(phase["cpu_ms_per_job"])
    assert result["dispatch"]["latency"]["jobs"] == 20
    assert set(result["advantage"]) == {"latency_p50", "latency_p99", "throughput"}
    # Both minimal dispatchers ran every job through their two worker processes.
    assert set(result["minimal"]) == {"bare", "protocol"}
    for variant in result["minimal"].values():
        assert variant["latency"]["jobs"] == 20
        assert variant["throughput"]["jobs"] == 40 and variant["throughput"]["processes"] == 2
        _assert_cpu_measured(variant["throughput"]["cpu_ms_per_job"])
    assert "the same work by a minimal dispatcher" in run.stdout
    assert "| throughput (jobs/s), 2 at once" in run.stdout.split("minimal dispatcher")[1]


def _assert_cpu_measured(used: dict[str, float | None]) -> None:
    """Each side was measured: the test broker runs here, so its process was found.

    How much CPU a 40-job phase shows is a sample (other processes are read in 10 ms
    ticks): only that every side has a reading, never less than none, is guaranteed.
    """
    assert set(used) == {"broker", "worker", "client"}
    for side, value in used.items():
        assert value is not None and value >= 0, f"{side}: {value}"
