"""/bin/true jobs on an SSH host against a daemon node on the same machine.

    python -m bench.ssh_hosts [--latency-jobs 100] [--throughput-jobs 300] [--slots 2]

Runs as root (the SSH host is a private sshd from tests/sshd.py on loopback, logging in as
root). Both nodes get the same slots; both workers run as root, the daemon node switching
each job to nobody (the main bench's second latency phase). Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import testbed
from bench.dispatch_side import run_latency, run_throughput, worker_argv
from dispatch import topology
from dispatch.client import Client

sys.path.insert(0, str(testbed.REPO / "tests"))
from sshd import Sshd


def _phase(url: str, argv: list[str], log: Path, pool: str,
           body: Callable[[Client, str], Any]) -> Any:
    with testbed.subprocess_running(argv, log) as proc:
        testbed.wait_for_consumer(url, topology.pool_queue(pool), proc)
        with Client(url) as client:
            try:
                return body(client, pool)
            finally:
                testbed.delete_queues(url, [topology.pool_queue(pool), client.reply_queue])


def _figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def _measure(url: str, argv: Callable[[str], list[str]], log: Path, args: argparse.Namespace,
             ) -> dict[str, Any]:
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    samples = _phase(url, argv(pool), log, pool,
                     lambda c, p: run_latency(c, p, args.latency_jobs, 5))
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    seconds = _phase(url, argv(pool), log.with_suffix(".2.log"), pool,
                     lambda c, p: run_throughput(c, p, args.throughput_jobs))
    return {**_figures(samples), "jobs_per_s": round(args.throughput_jobs / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.ssh_hosts")
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--throughput-jobs", type=int, default=300)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ssh."))
    work.chmod(0o755)  # the daemon node's jobs run as nobody under work/jobs
    sshd = Sshd(work / "sshd").start()
    try:
        (work / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public}\n")
        hosts = work / "hosts.yaml"
        hosts.write_text(yaml.safe_dump({
            "known_hosts": str(work / "known_hosts"),
            "hosts": [{"name": "loopback", "host": "127.0.0.1", "port": sshd.port,
                       "user": "root", "key_file": str(sshd.client_key),
                       "cores": args.slots, "scratch_root": str(work / "scratch"),
                       "python": "/usr/bin/python3"}]}))
        root = work / "jobs"
        root.mkdir(mode=0o755)
        with testbed.broker_url() as (url, where):
            print(f"ssh hosts bench: broker {where}", file=sys.stderr)
            daemon = _measure(url, lambda p: worker_argv(url, p, args.slots, root, None),
                              work / "daemon.log", args)
            ssh = _measure(url, lambda p: [*worker_argv(url, p, 1, root, None),
                                           "--ssh-hosts", str(hosts)],
                           work / "ssh.log", args)
    finally:
        sshd.stop()
    figures = {"slots": args.slots, "latency_jobs": args.latency_jobs,
               "throughput_jobs": args.throughput_jobs, "daemon_node": daemon,
               "ssh_host": ssh,
               "ssh_connections": sshd.log.read_text().count("Accepted publickey")}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
