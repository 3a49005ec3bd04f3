"""Multi-node jobs: real workers, each with its own real sshd, gathered by one head.

Each node is a separate ``dispatch worker`` process with ``--ssh-address`` pointing at an
sshd of its own (tests/sshd.py) whose authorized_keys file the node edits. The jobs run
their bootstrap on every node, an execute stage on the head that reads the hostfile and
runs a command on every host over SSH with the job's key, and a cleanup whose copy-back
directory comes back as one archive per node.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
from fixtures_ledger import LedgerProcess
from sshd import Sshd
from test_control import send_order

from dispatch import gang
from dispatch.client import Client
from dispatch.errors import JobTimeoutError
from dispatch.events import ControlOp
from dispatch.job import JobSpec, JobState, Nodes

from conftest import ROOT, Workers

pytestmark = pytest.mark.timeout(180)

EXECUTE = """\
set -e
while read -r host slots; do
  dir=$(awk -v h="$host" '$1 == h {print $2}' "$DISPATCH_WORKDIRS")
  ssh -n -F "$DISPATCH_SSH_CONFIG" "$host" "cat $dir/marker" >>seen.txt
done <"$DISPATCH_HOSTFILE"
cp "$DISPATCH_HOSTFILE" hostfile.txt
"""
BOOTSTRAP = 'echo "bootstrapped $DISPATCH_NODE" >marker'
CLEANUP = 'cp marker "$DISPATCH_COPYBACK/" && echo "cleaned on $DISPATCH_NODE"'


class GangNodes:
    """Worker processes of one pool, each with its own sshd, made on demand."""

    def __init__(self, workers: Workers, pool: str, base: Path) -> None:
        self.workers, self.pool, self.base = workers, pool, base
        self.sshds: dict[str, Sshd] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *, cpus: int = 1) -> str:
        name = f"g{len(self.sshds)}-{uuid.uuid4().hex[:6]}"
        sshd = Sshd(self.base / name).start()
        self.sshds[name] = sshd
        root = self.base / f"{name}-jobs"
        root.mkdir()
        root.chmod(0o755)
        self.procs[name] = self.workers.start(
            "--name", name, "--workdir-root", str(root),
            "--ssh-address", f"127.0.0.1:{sshd.port}", "--ssh-user", "root",
            "--ssh-authorized-keys", str(sshd.dir / "authorized_keys"),
            "--ssh-host-key", str(sshd.dir / "host_ed25519.pub"),
            pools=(self.pool,), slots=cpus)
        return name

    def gang_keys(self, name: str) -> list[str]:
        keys = (self.sshds[name].dir / "authorized_keys").read_text()
        return [line for line in keys.splitlines() if gang.KEY_COMMENT in line]

    def stop(self) -> None:
        for sshd in self.sshds.values():
            sshd.stop()


@pytest.fixture
def nodes(ledger_service: LedgerProcess, vhost_url: str, workdir_root: Path, tmp_path: Path,
          pool: str) -> Iterator[GangNodes]:
    """Gang nodes on this test's vhost, with a ledger: jobs are acked at their claim.

    The tests' broker times unacked deliveries out after 3 s (tests/rabbitmq), and without
    a ledger a node acks a job only at its end: a multi-node job takes longer than that.
    """
    ledger_service.start()
    workers = Workers(vhost_url, workdir_root, tmp_path)
    base = Path(tempfile.mkdtemp(prefix="gang.", dir=workdir_root))
    base.chmod(0o755)  # the job account traverses it to its working directories
    made = GangNodes(workers, pool, base)
    yield made
    workers.stop_all()
    made.stop()


@pytest.fixture
def client(vhost_url: str) -> Iterator[Client]:
    """A client on this test's vhost."""
    with Client(vhost_url) as c:
        yield c


def _spec(pool: str, low: int, high: int, **kwargs: object) -> JobSpec:
    fields: dict[str, object] = {
        "command": "/bin/sh", "arguments": ("-c", EXECUTE), "pool": pool,
        "nodes": Nodes(min=low, max=high, bootstrap=BOOTSTRAP, cleanup=CLEANUP, gather_s=2),
        "time_limit_s": 120}
    fields.update(kwargs)
    return JobSpec(**fields)  # type: ignore[arg-type]


def _members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return {name: zf.read(name) for name in zf.namelist() if not name.endswith("/")}


def _copied_back(tarball: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        return {m.name.lstrip("./"): tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}


def _wait(check: object, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("count", [2, 3])
def test_a_job_on_several_nodes_bootstraps_each_runs_over_ssh_and_brings_back_an_archive_each(
        nodes: GangNodes, client: Client, pool: str, count: int) -> None:
    names = [nodes.start() for _ in range(count)]
    result = client.submit(_spec(pool, count, count)).wait(timeout_s=150)
    files = _members(result.archive)
    assert result.state is JobState.EXITED and result.exit_code == 0, (result.reason, files.get(
        "job.err"))
    head = result.host
    assert head in names
    # execute reached every node over SSH and read the marker bootstrap left there
    seen = files["seen.txt"].decode().splitlines()
    assert sorted(seen) == sorted(f"bootstrapped {n}" for n in names)
    hostfile = files["hostfile.txt"].decode().splitlines()
    assert hostfile[0] == f"{head} slots=1" and sorted(hostfile) == sorted(
        f"{n} slots=1" for n in names)
    for name in names:
        # one copy-back archive per node, with what cleanup put there
        assert _copied_back(files[f"copyback/{name}.tar.gz"]) == {
            "marker": f"bootstrapped {name}\n"}
        out = files[f"logs/{name}.out"].decode()
        assert out.splitlines()[0].startswith(f"# node {name} 127.0.0.1:")
        assert f"cleaned on {name}" in out and files[f"logs/{name}.err"].startswith(b"# node")
    # every node let the job go: keys revoked, nothing left of its directories
    _wait(lambda: not any(nodes.gang_keys(n) for n in names), what="keys revoked")
    # (the head node removes its directory once idle after the final reply)
    _wait(lambda: not [p for n in names for p in (nodes.base / f"{n}-jobs").iterdir()
                       if not p.name.startswith(".")], what="job directories removed")
    # and each node is free again: a second job gathers them all
    again = client.submit(_spec(pool, count, count)).wait(timeout_s=150)
    assert again.exit_code == 0, again.reason


def test_a_job_waits_for_min_nodes_then_runs_when_a_node_joins(
        nodes: GangNodes, client: Client, pool: str, tmp_path: Path) -> None:
    first = nodes.start()
    handle = client.submit(_spec(pool, 2, 2))
    running = next(u for u in handle.updates(timeout_s=60) if u.state is JobState.RUNNING)
    assert running.host == first
    time.sleep(3)  # longer than GatherTime: with one node of two it must still wait
    with pytest.raises(JobTimeoutError):
        handle.wait(timeout_s=0.5)
    second = nodes.start()
    result = handle.wait(timeout_s=150)
    assert result.exit_code == 0, result.reason
    assert sorted(_members(result.archive)["seen.txt"].decode().splitlines()) == sorted(
        f"bootstrapped {n}" for n in (first, second))


def test_a_node_killed_mid_job_fails_the_job_naming_it_and_the_others_are_released(
        nodes: GangNodes, client: Client, pool: str) -> None:
    booted = nodes.base / "booted"
    booted.mkdir()
    booted.chmod(0o777)
    names = [nodes.start() for _ in range(3)]
    spec = _spec(pool, 3, 3, arguments=("-c", "sleep 120"),
                 nodes=Nodes(min=3, max=3, gather_s=1,
                             bootstrap=f'touch {booted}/"$DISPATCH_NODE"'))
    handle = client.submit(spec)
    _wait(lambda: len(list(booted.iterdir())) == 3, 120, "bootstrap on three nodes")
    head = next(u.host for u in handle.updates(timeout_s=5) if u.state is JobState.RUNNING)
    victim = next(n for n in names if n != head)
    nodes.procs[victim].send_signal(signal.SIGKILL)
    result = handle.wait(timeout_s=60)
    assert result.state is JobState.EXITED and result.exit_code != 0
    assert result.reason and f"node {victim} was lost mid-job" in result.reason
    survivor = next(n for n in names if n not in (head, victim))
    _wait(lambda: not nodes.gang_keys(survivor) and not nodes.gang_keys(head), 30,
          "the other nodes released")
    # the survivors serve again: a two-node job runs on them
    again = client.submit(_spec(pool, 2, 2)).wait(timeout_s=150)
    assert again.exit_code == 0, again.reason


def test_explain_says_how_many_nodes_the_head_holds_and_what_it_waits_for(
        nodes: GangNodes, client: Client, ledger_service: LedgerProcess, vhost_url: str,
        pool: str) -> None:
    first = nodes.start()
    handle = client.submit(_spec(pool, 2, 3))

    def explained() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "dispatch", "explain", handle.job_id],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
            env={**os.environ, "DISPATCH_LEDGER_URL": ledger_service.db_url,
                 "DISPATCH_BROKER_URL": vhost_url})
        return done.stdout

    _wait(lambda: "holds 1 of the 2 nodes it needs" in explained(), 60, "explain")
    out = explained()
    assert f"running on {first}" in out and f"waits for 1 more from pool {pool}" in out
    second = nodes.start()
    result = handle.wait(timeout_s=150)
    assert result.exit_code == 0, result.reason
    assert result.host == first
    assert second in _members(result.archive)["hostfile.txt"].decode()


def test_removing_a_multi_node_job_stops_it_everywhere_and_releases_its_nodes(
        nodes: GangNodes, client: Client, pool: str, vhost_url: str) -> None:
    booted = nodes.base / "booted"
    booted.mkdir()
    booted.chmod(0o777)
    names = [nodes.start() for _ in range(2)]
    handle = client.submit(_spec(pool, 2, 2, arguments=("-c", "sleep 120"),
                                 nodes=Nodes(min=2, max=2, gather_s=1,
                                             bootstrap=f'touch {booted}/"$DISPATCH_NODE"')))
    _wait(lambda: len(list(booted.iterdir())) == 2, 120, "bootstrap on two nodes")
    with kombu.Connection(vhost_url) as conn:
        send_order(conn, ControlOp.REMOVE, (handle.job_id,))
    result = handle.wait(timeout_s=60)
    assert result.state is JobState.REMOVED, (result.state, result.reason)
    _wait(lambda: not any(nodes.gang_keys(n) for n in names), 30, "keys revoked")
    assert not _processes_with("sleep 120")
    again = client.submit(_spec(pool, 2, 2)).wait(timeout_s=150)
    assert again.exit_code == 0, again.reason


def _processes_with(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


LOOPBACK = "--mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
HELLO_C = """\
#include <mpi.h>
#include <stdio.h>

int main(int argc, char** argv) {
  MPI_Init(NULL, NULL);
  int world_size;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  int world_rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  char processor_name[MPI_MAX_PROCESSOR_NAME];
  int name_len;
  MPI_Get_processor_name(processor_name, &name_len);
  printf("Hello world from processor %s, rank %d out of %d processors\\n",
         processor_name, world_rank, world_size);
  MPI_Finalize();
}
"""


@pytest.mark.skipif(not shutil.which("mpicc") or not shutil.which("mpirun"),
                    reason="Open MPI is not installed (scripts/setup installs openmpi-bin)")
def test_the_seeds_mpi_hello_world_runs_across_two_nodes_from_an_openstack_queue_job_file(
        nodes: GangNodes, pool: str, vhost_url: str, tmp_path: Path) -> None:
    names = [nodes.start() for _ in range(2)]
    build = nodes.base / "build"
    build.mkdir()
    (build / "hello.c").write_text(HELLO_C)
    subprocess.run(["mpicc", "-o", str(build / "a.out"), str(build / "hello.c")], check=True,
                   timeout=120)
    logs, results = tmp_path / "logs", tmp_path / "results"
    # openstack-queue's own example, single quotes and all: only the sizes, the paths and
    # the bootstrap (Open MPI is installed here, not apt-get'ed) differ. Jobs run as an
    # unprivileged account; the loopback-only MCA settings are for nodes on one machine.
    (tmp_path / "myjob.json").write_text(f"""{{
        'groupName':'hello',
        'minNodes':2,
        'maxNodes':2,
        'minNodeSize':1,
        'logPath':'{logs}/',
        'resultsPath':'{results}/',
        'payloadFiles':['{build / "a.out"}'],
        'bootstrapScript':'command -v mpirun',
        'executeScript':'mpirun --display-map {LOOPBACK} --hostfile /tmp/hostfile /tmp/a.out',
        'cleanupScript':''
}}
""")
    done = subprocess.run(
        [sys.executable, "-m", "dispatch", "submit", "--pool", pool, "--wait",
         str(tmp_path / "myjob.json")], capture_output=True, text=True, timeout=170,
        cwd=tmp_path, check=False,
        env={**os.environ, "DISPATCH_BROKER_URL": vhost_url,
             "DISPATCH_CONFIG_DIR": str(tmp_path / "config")})
    assert done.returncode == 0, done.stdout + done.stderr
    out = next(tmp_path.glob("dispatch-results/*/job.out")).read_text()
    ranks = sorted(line for line in out.splitlines() if line.startswith("Hello world"))
    assert [r.split(", ", 1)[1] for r in ranks] == [
        "rank 0 out of 2 processors", "rank 1 out of 2 processors"], out
    assert all(f"Data for node: {name}" in out for name in names), out  # one rank a node
    job_logs = next(logs.iterdir())
    assert sorted(p.name for p in job_logs.iterdir()) == sorted(
        f"{n}.{ext}" for n in names for ext in ("out", "err"))
    assert sorted(p.name for p in next(results.iterdir()).iterdir()) == sorted(
        f"{n}.tar.gz" for n in names)
