"""End to end with every part real: a ``dispatch worker`` named after its server heartbeats
to a real ``dispatch ledger``; beat finds it idle, drains it, the worker leaves, the server goes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloud_fixtures import Processes, old, ours, wait_until
from fixtures_ledger import LedgerProcess
from openstack_double import OpenStackDouble

from dispatch.ledger.store import Ledger

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def node_proc(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_idle_real_worker_is_drained_leaves_by_itself_and_its_server_is_deleted(
        cloud_double: OpenStackDouble, cloud_procs: Processes, cloud_env: dict[str, str],
        vhost_url: str, ledger_service: LedgerProcess, workdir_root: Path, tmp_path: Path,
        pool: str, node_proc: list[subprocess.Popen[bytes]]) -> None:
    ledger_service.start()
    cloud_env.update({"DISPATCH_BROKER_URL": vhost_url,
                      "DISPATCH_LEDGER_URL": ledger_service.db_url,
                      "DISPATCH_CLOUD_REAP_EVERY": "1", "DISPATCH_CLOUD_IDLE_TIMEOUT": "2"})
    name = f"dispatch-{pool}-0001"
    server_id = cloud_double.add_server(name, metadata=ours(pool, created=old(300),
                                                           lifetime_s=86400))
    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "worker", "--broker", vhost_url, "--name", name,
             "--pool", pool, "--workdir-root", str(workdir_root), "--slots", "1",
             "--kill-grace", "1", "--heartbeat-interval", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    node_proc.append(node)

    def node_online(led: Ledger) -> bool:
        return any(n.name == name and n.online for n in led.nodes())

    ledger_service.wait_for(node_online)
    cloud_procs.celery_worker()
    cloud_procs.celery_beat()
    describe = lambda: cloud_procs.logs() + log_path.read_text()[-3000:]  # noqa: E731
    wait_until(lambda: node.poll() is not None, "the drained worker to exit", timeout_s=40,
               describe=describe)
    assert node.returncode == 0, describe()
    wait_until(lambda: server_id not in cloud_double.state.servers,
               "the drained server's deletion", describe=describe)
    assert cloud_double.deleted_servers() == [server_id]
    meta_reason = [r for r in cloud_double.calls("POST", r"/metadata$")
                   if "drain_reason" in r.body["metadata"]]
    assert meta_reason[0].body["metadata"]["drain_reason"].startswith("idle for ")
    led = ledger_service.ledger()
    try:
        [record] = [n for n in led.nodes() if n.name == name]
    finally:
        led.close()
    assert not record.online
    assert record.offline_reason == "drained by guest"
