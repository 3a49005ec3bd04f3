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

from bench import code_ab, cpu, minimal, report

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


def test_the_protocol_floor_keeps_dispatchs_guarantees_for_a_short_job():
    # A short job has no Running reply in Dispatch's protocol, so the floor sends none;
    # a variant may still name it.
    assert minimal.features("protocol") == {"priority", "submit-confirms", "reply-confirms"}
    assert minimal.features("bare") == frozenset()
    assert minimal.features("reply-confirms+running") == {"reply-confirms", "running"}
    with pytest.raises(ValueError, match="unknown variant"):
        minimal.features("reply-confirms+gzip")


def test_issue_16s_targets_are_ratios_within_one_run():
    dispatch = {"latency": {"p50_ms": 2.0, "p99_ms": 3.0},
                "throughput_2slot": {"jobs_per_s": 750.0}}
    celery = {"latency": {"p50_ms": 3.7, "p99_ms": 5.5}, "throughput": {"jobs_per_s": 500.0}}
    ledger = {"latency": {"p50_ms": 2.4, "p99_ms": 4.0},
              "throughput_2slot": {"jobs_per_s": 400.0}}
    floor = {"bare": {"throughput": {"jobs_per_s": 1000.0}}}
    ratios = report.round_ratios(dispatch, celery, ledger, floor)
    assert ratios["of_bare"] == 0.75 and ratios["ledger_ratio"]["latency_p50"] == 1.2
    met = report.targets(dispatch, ratios["advantage"], ratios["ledger_ratio"],
                         ratios["of_bare"])
    assert met["throughput>=1.5x_celery"] and met["throughput>=0.75x_bare"]
    assert met["p50>=1.8x_celery"] and met["p99>=1.8x_celery"]
    assert met["ledger_p50<=1.25x_no_ledger"]
    floor["bare"]["throughput"]["jobs_per_s"] = 1020.0
    celery["latency"]["p99_ms"] = 5.3
    ratios = report.round_ratios(dispatch, celery, ledger, floor)
    met = report.targets(dispatch, ratios["advantage"], ratios["ledger_ratio"],
                         ratios["of_bare"])
    assert not met["throughput>=0.75x_bare"] and not met["p99>=1.8x_celery"]
    assert met["p50>=1.8x_celery"]
    # Without Celery, a ledger or the floor, their targets are not judged at all.
    assert report.round_ratios(dispatch, None, None, None) == {}
    assert set(report.targets(dispatch, None)) == {"p50_ms<=2.0", "p99_ms<=4",
                                                   "jobs_per_s>=800"}


@pytest.mark.parametrize("rounds", ["0", "-2", "two"])
def test_a_round_count_below_one_is_a_one_line_usage_error(rounds: str):
    run = subprocess.run([sys.executable, "-m", "bench", "--rounds", rounds], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert f"argument --rounds: {rounds!r}: give a whole number of 1 or more" in run.stderr


def test_several_rounds_report_the_median_of_each_figure():
    runs = [{"latency": {"p50_ms": p50, "jobs": 10, "user": "nobody"}, "cpu": None}
            for p50 in (3.0, 1.0, 2.0)]
    assert report.median_figures(runs) == {
        "latency": {"p50_ms": 2.0, "jobs": 10, "user": "nobody"}, "cpu": None}
    table = report.rounds_table([{"advantage": {"latency_p50": 1.5, "latency_p99": 1.6,
                                                "throughput": 1.2}, "of_bare": 0.6}, {}])
    assert "| 1 | 1.5 | 1.6 | 1.2 | - | 0.6 |" in table and "| 2 | - | - | - | - | - |" in table


def test_the_bench_measures_dispatch_celery_and_the_floor_and_writes_its_run(vhost_url,
                                                                            tmp_path):
    # A vhost of its own: the ledger phase's queues have fixed names.
    env = {**os.environ, "DISPATCH_BROKER_URL": vhost_url}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--latency-jobs", "6", "--warmup", "2",
         "--throughput-jobs", "12", "--rounds", "2", "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| latency p50 (ms), 1 in flight" in run.stdout
    assert "CPU ms/job, broker" in run.stdout
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    for phase in (result["dispatch"]["throughput_2slot"], result["celery"]["throughput"]):
        assert phase["jobs"] == 12 and phase["jobs_per_s"] > 0
        _assert_cpu_measured(phase["cpu_ms_per_job"])
    assert result["dispatch"]["latency"]["jobs"] == 6
    assert set(result["advantage"]) == {"latency_p50", "latency_p99", "throughput"}
    # Both minimal dispatchers ran every job through their two worker processes.
    assert set(result["minimal"]) == {"bare", "protocol"}
    for variant in result["minimal"].values():
        assert variant["latency"]["jobs"] == 6
        assert variant["throughput"]["jobs"] == 12 and variant["throughput"]["processes"] == 2
        _assert_cpu_measured(variant["throughput"]["cpu_ms_per_job"])
    assert "the same work by a minimal dispatcher" in run.stdout
    # The ledger phase ran the same jobs with claims on, and the ledger holds every one.
    ledger = result["ledger"]
    assert ledger["latency"]["jobs"] == 6 and ledger["latency"]["ledger_recorded"] == 8
    assert ledger["throughput_2slot"]["jobs"] == 12
    assert ledger["throughput_2slot"]["ledger_recorded"] == 14
    used = ledger["throughput_2slot"]["cpu_ms_per_job"]
    _assert_cpu_measured({side: used[side] for side in ("broker", "worker", "client")})
    assert used["ledger"] is not None and used["database"] is not None
    assert set(result["ledger_ratio"]) == {"latency_p50", "latency_p99", "throughput"}
    assert "ledger_p50<=1.25x_no_ledger" in result["targets"]
    assert {"p50>=1.8x_celery", "p99>=1.8x_celery",
            "throughput>=0.75x_bare"} <= set(result["targets"])
    assert "with a ledger (claims and events on)" in run.stdout
    assert "| throughput (jobs/s), 2 at once" in run.stdout.split("minimal dispatcher")[1]
    # Two rounds, in turns: every system measured twice, each round's ratios kept.
    assert result["rounds"] == 2 and len(result["per_round"]) == 2
    assert [r["dispatch"]["latency"]["jobs"] for r in result["per_round_figures"]] == [6, 6]
    for ratios in result["per_round"]:
        assert set(ratios) == {"advantage", "ledger_ratio", "of_bare"}
    assert {"after_dispatch_1", "after_minimal_1", "after_minimal_2",
            "after_dispatch_2"} <= set(result["load_average_1_5_15min"])
    assert "2 rounds (figures above: medians" in run.stdout


def _assert_cpu_measured(used: dict[str, float | None]) -> None:
    """Each side was measured: the test broker runs here, so its process was found.

    How much CPU a 12-job phase shows is a sample (other processes are read in 10 ms
    ticks): only that every side has a reading, never less than none, is guaranteed.
    """
    assert set(used) == {"broker", "worker", "client"}
    for side, value in used.items():
        assert value is not None and value >= 0, f"{side}: {value}"


def test_the_scale_phases_run_tiny_and_measure_every_figure(vhost_url, tmp_path):
    env = {**os.environ, "DISPATCH_BROKER_URL": vhost_url}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--scale", "--scale-jobs", "200", "--scale-nodes", "1,2",
         "--scale-node-jobs", "30", "--scale-ledger-jobs", "2000", "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    scale = json.loads(written.read_text())["scale"]
    # The backlog: all queued before any node, memory read at 1%, 10%, 50% and 100%.
    queued = scale["queued"]
    assert queued["submit"]["queued"] == 200 and queued["submit"]["jobs_per_s"] > 0
    assert queued["drain"]["jobs_per_s"] > 0
    assert all(mib is not None for mib in queued["broker_mib"].values())
    for phase in ("submit", "drain"):
        assert [s["jobs"] for s in queued[phase]["rss"]] == [2, 20, 100, 200]
        assert all(s["client_mib"] for s in queued[phase]["rss"])
    assert all(len(s["nodes_mib"]) == 2 and all(s["nodes_mib"]) for s in queued["drain"]["rss"])
    assert len(queued["rss_spread_mib"]) == 4
    assert all(v is not None for v in queued["rss_spread_mib"].values())
    # One step per node count, each with its throughput, latency and CPU per side.
    steps = scale["nodes"]["steps"]
    assert [s["nodes"] for s in steps] == [1, 2]
    for step in steps:
        assert step["jobs"] == 30 and step["jobs_per_s"] > 0 and step["p99_ms"] > 0
        assert all(v is not None for v in step["cpu_ms_per_job"].values())
    assert scale["nodes"]["ledger_recorded"] == 30 + 5 + 30 + 10  # with the warm-up jobs
    # The filled ledger, every command timed and every query explained.
    fill = scale["ledger"]["fill"]
    assert fill["jobs_by_state"]["Exited"] >= 2000 and fill["jobs_by_state"]["Idle"] == 2
    assert fill["history_rows"] > 2000
    commands = scale["ledger"]["commands"]
    assert {"dispatch q", "dispatch history", "dispatch history JOBID"} <= set(commands)
    assert all(c["median_s"] > 0 and c["lines"] > 0 for c in commands.values())
    assert all(q["plan"] for q in scale["ledger"]["queries"].values())
    assert set(scale["targets"]) == {"rss_flat_within_20MiB", "q_under_1s", "history_under_1s"}
    assert "| nodes | in flight | jobs/s |" in run.stdout


def test_a_code_ab_arm_is_that_revisions_code_with_this_trees_bench(tmp_path):
    home = code_ab._arm(tmp_path, "A", "HEAD")
    src = home / "src"
    for package in ("dispatch", "workers", "schemas", "bench"):
        assert (src / package / ("__init__.py" if package != "schemas" else
                                 "job-request.schema.json")).is_file()
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:dispatch/client.py"],
                               capture_output=True, check=True).stdout
    assert (src / "dispatch" / "client.py").read_bytes() == committed
    here = (ROOT / "bench" / "code_ab.py").read_bytes()
    assert (src / "bench" / "code_ab.py").read_bytes() == here


def test_code_ab_sums_up_each_figure_as_medians_and_b_over_a():
    rows = {"A": [{"latency": {"p50_ms": 2.0}, "throughput": {"jobs_per_s": 500.0}},
                  {"latency": {"p50_ms": 4.0}, "throughput": {"jobs_per_s": 700.0}}],
            "B": [{"latency": {"p50_ms": 1.5}, "throughput": {"jobs_per_s": 660.0}},
                  {"latency": {"p50_ms": 1.5}, "throughput": {"jobs_per_s": 540.0}}]}
    lines = code_ab._summary(rows)
    p50 = next(line for line in lines if line.startswith("latency p50_ms"))
    assert p50.split()[2:] == ["3.000", "1.500", "0.500"]
    rate = next(line for line in lines if line.startswith("throughput jobs_per_s"))
    assert rate.split()[2:] == ["600.000", "600.000", "1.000"]
    assert not any(line.startswith("ledger") for line in lines)  # not measured: left out
