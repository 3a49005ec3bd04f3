"""The real ``dispatch cloud`` command against the OpenStack double (the docs/cloud.md commands)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cloud_fixtures import heartbeat, old, ours
from openstack_double import PASSWORD, OpenStackDouble

from dispatch import events
from dispatch.ledger.store import Ledger
from workers.cloud import metadata
from workers.cloud.settings import VARIABLES

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cloud_cli(cloud_env: dict[str, str], tmp_path: Path) -> Run:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "dispatch", "cloud", *args],
                                env=env or cloud_env, capture_output=True, text=True,
                                timeout=60, cwd=tmp_path, check=False)
        assert PASSWORD not in result.stdout + result.stderr
        return result

    return run


def test_flavors_lists_the_clouds_flavors_smallest_first(cloud_cli: Run) -> None:
    result = cloud_cli("flavors")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "VCPUS", "RAM_MB", "DISK_GB", "EPHEMERAL_GB",
                                "PUBLIC"]
    assert [line.split()[0] for line in lines[1:]] == [
        "m1.tiny", "m1.small", "me1.small", "m1.medium", "m1.large", "jt.large", "m1.xlarge"]
    data = json.loads(cloud_cli("flavors", "--json").stdout)
    assert {"name": "jt.large", "id": "5d234569", "vcpus": 4, "ram_mb": 16384,
            "disk_gb": 10, "ephemeral_gb": 10, "public": True} in data


def test_provision_then_nodes_shows_pool_flavor_lifetime_state_and_jobs(
        cloud_cli: Run, cloud_double: OpenStackDouble, cloud_ledger: Ledger) -> None:
    result = cloud_cli("provision", "analysis", "--count", "2", "--cpus", "2", "--memory", "3G",
                       "--lifetime", "12h")
    assert result.returncode == 0, result.stderr
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert len(names) == 2
    assert all(line.split("\t")[1] == "m1.medium" for line in result.stdout.splitlines())
    heartbeat(cloud_ledger, names[0], "analysis", running=("job-7",))
    rows = {r["server"]: r for r in json.loads(cloud_cli("nodes", "--json").stdout)}
    assert set(rows) == set(names)
    busy, fresh = rows[names[0]], rows[names[1]]
    assert (busy["pool"], busy["flavor"], busy["state"]) == ("analysis", "m1.medium",
                                                              "ACTIVE/busy")
    assert busy["jobs"] == "1 running, 3 done"
    assert fresh["state"] == "ACTIVE/no worker"
    assert fresh["left"].startswith("11:59:") or fresh["left"] == "12:00:00"
    table = cloud_cli("nodes").stdout
    assert table.splitlines()[0].split() == ["SERVER", "POOL", "FLAVOR", "AGE", "LEFT", "STATE",
                                             "JOBS"]


def test_reap_dry_run_says_what_and_why_and_deletes_nothing(
        cloud_cli: Run, cloud_double: OpenStackDouble) -> None:
    cloud_double.add_server("dispatch-p-old",
                            metadata=ours("p", created=old(7200), lifetime_s=3600))
    cloud_double.add_server("dispatch-p-broken", status="ERROR",
                      metadata=ours("p", created=old(30), lifetime_s=3600))
    cloud_double.add_server("dispatch-p-young",
                            metadata=ours("p", created=old(30), lifetime_s=3600))
    result = cloud_cli("reap", "--dry-run")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"dispatch-p-old", "dispatch-p-broken"}
    assert "would delete  lifetime ended 1h00m ago" in rows["dispatch-p-old"]
    assert "would delete  server is in ERROR" in rows["dispatch-p-broken"]
    assert cloud_double.deleted_servers() == []
    result = cloud_cli("reap")
    assert result.returncode == 0, result.stderr
    assert cloud_double.server_names() == {"dispatch-p-young"}
    assert cloud_cli("reap", "--dry-run").stdout.strip() == "nothing to reap"


def test_extend_pushes_the_end_of_life_and_spares_the_server(
        cloud_cli: Run, cloud_double: OpenStackDouble) -> None:
    cloud_double.add_server("dispatch-p-late",
                            metadata=ours("p", created=old(7200), lifetime_s=3600))
    result = cloud_cli("extend", "dispatch-p-late", "2h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dispatch-p-late now expires at ")
    meta = cloud_double.by_name("dispatch-p-late")["metadata"]
    ends = metadata.parse_time(meta[metadata.EXPIRES_AT])
    assert ends is not None
    assert ends > metadata.parse_time(events.now())  # type: ignore[operator]
    assert meta[metadata.LIFETIME_S] == str(int(
        (ends - metadata.parse_time(meta[metadata.CREATED_AT])).total_seconds()))  # type: ignore[operator]
    assert cloud_cli("reap", "--dry-run").stdout.strip() == "nothing to reap"


def test_bad_input_gets_one_clear_line_naming_the_problem(
        cloud_cli: Run, cloud_env: dict[str, str]) -> None:
    too_big = cloud_cli("provision", "p", "--cpus", "16", "--scratch", "30G")
    assert too_big.returncode == 125
    assert too_big.stderr.startswith("dispatch: error: no flavor meets 16 cores")
    assert "closest: " in too_big.stderr
    bad_memory = cloud_cli("provision", "p", "--memory", "lots")
    assert bad_memory.returncode == 2
    assert "--memory" in bad_memory.stderr
    missing = cloud_cli("extend", "no-such-node", "1h")
    assert missing.returncode == 125
    assert "no Dispatch server named 'no-such-node'" in missing.stderr
    env = {k: v for k, v in cloud_env.items() if k != "DISPATCH_CLOUDS_YAML"}
    unset = cloud_cli("flavors", env=env)
    assert unset.returncode == 125
    assert "DISPATCH_CLOUDS_YAML is not set" in unset.stderr


def test_the_cloud_page_documents_every_setting_and_runs_only_tested_commands() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "cloud.md").read_text()
    assert [name for name in VARIABLES if f"| `{name}` |" not in page] == []
    shown = {line.split()[2] for line in page.splitlines()
             if line.startswith("dispatch cloud ")}
    assert shown == {"flavors", "provision", "nodes", "reap", "extend"}
