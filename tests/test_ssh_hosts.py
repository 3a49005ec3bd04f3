"""``dispatch worker --ssh-hosts``: jobs on three real sshd "hosts" on loopback, no daemon.

Each host is a real OpenSSH server (tests/sshd.py) with its own port, host key, client
key and scratch root; one node process serves all three over one SSH connection each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sshd import Sshd
from test_control import send_order

from dispatch.client import Client
from dispatch.events import ControlOp
from dispatch.job import JobSpec, JobState, Resources
from workers.sshhosts import HostsFileError, parse_hosts

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
#: name, cores, groups: "a" is the big one, "c" the only one outside group x.
HOSTS = [("a", 4, ["x", "big"]), ("b", 2, ["x"]), ("c", 1, ["y"])]


class Hosts:
    """Three sshd servers standing for three hosts, and the hosts file naming them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers = {name: Sshd(base / f"sshd-{name}").start() for name, _, _ in HOSTS}
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text("".join(f"[127.0.0.1]:{s.port} {s.host_public}\n"
                                            for s in self.servers.values()))
        self.path = base / "hosts.yaml"
        self.path.write_text(yaml.safe_dump({
            "known_hosts": str(self.known_hosts), "reconnect_max_s": 1,
            "defaults": {"user": "root"},
            "hosts": [{"name": name, "host": "127.0.0.1", "port": self.servers[name].port,
                       "key_file": str(self.servers[name].client_key), "cores": cores,
                       "memory": "1G", "groups": groups,
                       "scratch_root": str(self.scratch(name))} for name, cores, groups in HOSTS],
        }))

    def scratch(self, name: str) -> Path:
        return self.base / f"scratch-{name}"

    def sessions(self, name: str) -> int:
        """Return how many SSH connections host ``name`` accepted."""
        return self.servers[name].log.read_text().count("Accepted publickey")

    def cut(self, name: str) -> None:
        """Kill host ``name``'s sshd and its connections (the job wrappers see their end)."""
        server = self.servers[name]
        assert server.proc is not None
        for pid in [*_descendants(server.proc.pid), server.proc.pid]:
            if _comm(pid) == "sshd":
                os.kill(pid, signal.SIGKILL)
        server.proc.wait(timeout=10)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path)
    yield h
    h.stop()


@pytest.fixture
def ssh_node(workers: Any, hosts: Hosts, pool: str) -> subprocess.Popen[bytes]:
    return workers.start("--ssh-hosts", str(hosts.path), "--heartbeat-interval", "0.5",
                         pools=(pool,))


def run(client: Client, pool: str, *args: str, **spec: Any) -> Any:
    return client.submit(JobSpec(args[0], args[1:], pool=pool, **spec)).wait(timeout_s=60)


def test_jobs_land_on_the_host_their_requirements_pick(ssh_node, client, pool, hosts, tmp_path):
    cases = {
        'Machine == "b"': "b",  # wq's host: b
        'stringListMember("y", Groups)': "c",  # group: y
        '!stringListMember("x", Groups)': "c",  # not_group: x
        'stringListMember("big", Groups) && Cpus >= 4': "a",
    }
    home_dirs: list[str] = []
    for requirements, host in cases.items():
        result = run(client, pool, "sh", "-c", "echo $HOME", requirements=requirements)
        assert (result.state, result.exit_code, result.host) == (JobState.EXITED, 0, host)
        where = tmp_path / f"out-{len(home_dirs)}"
        result.extract(where)
        home = (where / "job.out").read_text().strip()
        home_dirs.append(home)
        assert home.startswith(f"{hosts.scratch(host)}/")
        assert not Path(home).exists()  # the directory is removed after the zip came back
    three = run(client, pool, "true", resources=Resources(cpus=3))
    assert three.host == "a"
    never = run(client, pool, "true", resources=Resources(cpus=8))
    assert never.state is JobState.REJECTED
    assert "no SSH host can run it" in (never.reason or "") and "c: RequestCpus 8" in never.reason


def test_inputs_go_in_and_out_and_err_come_back_as_from_a_daemon_node(ssh_node, client, pool,
                                                                       tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("from the client\n")
    handle = client.submit(JobSpec("sh", ("-c", "cat data.txt; echo oops >&2; exit 3"),
                                   inputs=(data,), pool=pool))
    states = [u.state for u in handle.updates(timeout_s=60)]
    assert states == [JobState.RUNNING, JobState.EXITED]
    result = handle.wait(timeout_s=5)
    out = result.extract(tmp_path / "out")
    assert sorted(out.names) == ["data.txt", "job.err", "job.out"]
    assert (tmp_path / "out" / "job.out").read_text() == "from the client\n"
    assert (tmp_path / "out" / "job.err").read_text() == "oops\n"
    assert result.exit_code == 3


def test_a_time_limit_kills_the_whole_process_tree_on_the_host(ssh_node, client, pool, hosts):
    script = "setsid sleep 7771 & (sleep 7772 &) ; sleep 7773"
    result = run(client, pool, "sh", "-c", script, time_limit_s=1, requirements='Machine == "b"')
    assert result.state is JobState.EXITED
    assert result.exit_signal == signal.SIGTERM
    assert not _processes("sleep 777")
    assert list(hosts.scratch("b").iterdir()) == []


def test_a_remove_order_kills_the_job_on_its_host(ssh_node, client, pool, amqp):
    handle = client.submit(JobSpec("sh", ("-c", "sleep 7781 & sleep 7782"), pool=pool))
    updates = handle.updates(timeout_s=60)
    assert next(updates).state is JobState.RUNNING
    send_order(amqp, ControlOp.REMOVE, (handle.job_id,))  # what `dispatch rm` has sent
    final = next(updates)
    assert final.state is JobState.REMOVED
    assert final.reason == "removed by alice: test says so"
    assert not _processes("sleep 778")


def test_200_jobs_spread_over_three_hosts_on_one_connection_each(ssh_node, client, pool, hosts):
    handles = client.submit_many(JobSpec("true", pool=pool) for _ in range(200))
    results = [h.wait(timeout_s=90) for h in handles]
    assert all(r.state is JobState.EXITED and r.exit_code == 0 for r in results)
    assert {r.host for r in results} == {"a", "b", "c"}
    assert {name: hosts.sessions(name) for name in hosts.servers} == {"a": 1, "b": 1, "c": 1}


def test_a_host_that_stops_answering_is_down_its_job_reruns_elsewhere_and_it_comes_back(
        workers, hosts, ledger_service, vhost_url, tmp_path):
    ledger_service.start()
    workers.broker_url = vhost_url
    workers.start("--ssh-hosts", str(hosts.path), "--heartbeat-interval", "0.5",
                  pools=("ssh",))
    stat = _stat(ledger_service.db_url, vhost_url)
    _until(lambda: all(_state(stat(), h) == "up" for h in "abc"), "every host up")
    with Client(vhost_url) as client:
        # A duration no other process on the machine sleeps for: the scan below finds it.
        handle = client.submit(JobSpec("sh", ("-c", "sleep 3.0417; echo done"), pool="ssh",
                                       requirements='stringListMember("x", Groups)'))
        updates = handle.updates(timeout_s=60)
        first = next(updates)
        assert (first.state, first.host) == (JobState.RUNNING, "a")
        hosts.cut("a")
        rest = list(updates)
    runs = [u.host for u in rest if u.state is JobState.RUNNING]
    assert runs == ["b"]  # run again once, elsewhere
    assert (rest[-1].state, rest[-1].host, rest[-1].exit_code) == (JobState.EXITED, "b", 0)
    assert _state(stat(), "a") == "down"
    assert not _processes("sleep 3.0417")
    hosts.servers["a"].start()
    _until(lambda: _state(stat(), "a") == "up", "host a up again")


def test_hosts_file_mistakes_are_one_line_naming_the_field(tmp_path):
    key = tmp_path / "key"
    key.write_text("not read here")
    good = {"host": "h1", "cores": 2, "key_file": str(key), "known_hosts": str(key)}
    cases = [
        ({"hosts": []}, "hosts: must be a non-empty list"),
        ({"hosts": [{**good, "cores": "four"}]}, "hosts[0].cores: must be a whole number"),
        ({"hosts": [{**good, "memory": "lots"}]}, "hosts[0].memory: must be a size"),
        ({"hosts": [{**good, "colour": 1}]}, "hosts[0].colour: unknown field"),
        ({"hosts": [good, good]}, "hosts[1].name: 'h1' is used by another host"),
        ({"hosts": [{**good, "known_hosts": str(tmp_path / "nope")}]},
         "hosts[0].known_hosts: "),
        ({"hosts": [{k: v for k, v in good.items() if k != "cores"}]},
         "hosts[0].cores: is required"),
    ]
    for data, expected in cases:
        with pytest.raises(HostsFileError) as info:
            parse_hosts(data, source="h.yaml")
        assert str(info.value).startswith(f"h.yaml: {expected}"), str(info.value)
        assert "\n" not in str(info.value)
    parsed = parse_hosts({"known_hosts": str(key), "defaults": {"key_file": str(key)},
                          "hosts": [{"host": "h1", "cores": 2, "memory": "2G",
                                     "groups": "gen1,slow"}]})
    assert parsed.hosts[0].memory_mb == 2048 and parsed.hosts[0].groups == ("gen1", "slow")


def test_a_host_whose_key_is_not_known_is_never_used(workers, hosts, pool, client):
    hosts.known_hosts.write_text("")
    proc = workers.start("--ssh-hosts", str(hosts.path), pools=(pool,))
    handle = client.submit(JobSpec("true", pool=pool))
    with pytest.raises(Exception, match=r"within|timed out|no final"):
        handle.wait(timeout_s=3)
    assert proc.poll() is None
    assert "not found in known_hosts" in workers.log()
    assert all(hosts.sessions(name) == 0 for name in hosts.servers)


# -- helpers ------------------------------------------------------------------------------

def _stat(db_url: str, broker_url: str) -> Callable[[], str]:
    env = {**os.environ, "DISPATCH_LEDGER_URL": db_url, "DISPATCH_BROKER_URL": broker_url}

    def stat() -> str:
        done = subprocess.run([sys.executable, "-m", "dispatch", "stat"], capture_output=True,
                              text=True, timeout=60, cwd=ROOT, env=env, check=False)
        return done.stdout

    return stat


def _state(table: str, host: str) -> str | None:
    for line in table.splitlines():
        words = line.split()
        if words and words[0] == host:
            return words[1]
    return None


def _until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never: {what}")
        time.sleep(0.2)


def _processes(marker: str) -> list[str]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rfind(b")") + 2:].split()[1]), []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found



