"""The one module that uses fabric: copy a payload to a server, run its bootstrap script.

The host key is checked against an explicit known_hosts file with paramiko's
RejectPolicy (fabric's default would accept any key). Secrets never reach a remote
command line: the broker URL travels in ``worker.env`` (mode 0600, in a 0700
directory), which the bootstrap script sources before it starts
``dispatch worker --name NODE --pool POOL`` detached from the SSH session.
"""

from __future__ import annotations

import io
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import fabric
import invoke.exceptions
import paramiko

from workers.cloud.errors import BootstrapError, HostKeyError

log = logging.getLogger(__name__)

SCRIPT_NAME = "bootstrap.sh"
ENV_NAME = "worker.env"

#: The bootstrap script used when the payload brings none. It runs in the remote
#: directory with DISPATCH_NODE_NAME, DISPATCH_POOL, DISPATCH_COMMAND and
#: DISPATCH_WORKER_ARGS set; worker.env holds DISPATCH_BROKER_URL.
DEFAULT_SCRIPT = """\
#!/bin/sh
# Start a Dispatch execute node for this server, detached from the SSH session.
set -eu
cd "$(dirname "$0")"
if [ -x payload/setup.sh ]; then ./payload/setup.sh; fi
set -a; . ./worker.env; set +a
# shellcheck disable=SC2086 - DISPATCH_WORKER_ARGS is a list of words
setsid nohup $DISPATCH_COMMAND worker --name "$DISPATCH_NODE_NAME" --pool "$DISPATCH_POOL" \\
    $DISPATCH_WORKER_ARGS >worker.log 2>&1 </dev/null &
echo $! >worker.pid
sleep 1
kill -0 "$(cat worker.pid)" || { tail -n 20 worker.log >&2; exit 1; }
"""


@dataclass(frozen=True)
class Target:
    """How to reach a server over SSH."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path


@dataclass(frozen=True)
class WorkerSpec:
    """The worker to start on a server."""

    node: str
    pool: str
    broker_url: str
    dispatch: str = "dispatch"
    worker_args: tuple[str, ...] = ()


def connection(target: Target) -> fabric.Connection:
    """Return an unopened fabric connection that checks the host key against known_hosts."""
    config = fabric.Config(overrides={"run": {"in_stream": False}, "load_ssh_configs": False})
    conn = fabric.Connection(target.host, user=target.user, port=target.port, config=config,
                             connect_timeout=15,
                             connect_kwargs={"key_filename": str(target.key_file),
                                             "look_for_keys": False, "allow_agent": False})
    client = paramiko.SSHClient()
    if target.known_hosts.is_file():
        client.load_host_keys(str(target.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client = client
    return conn


def start_worker(target: Target, spec: WorkerSpec, *, payload: Path | None = None,
                 remote_dir: str = "dispatch-node") -> None:
    """Copy ``payload`` and the env file to ``remote_dir``, run the bootstrap script.

    Raises HostKeyError when the server's key is not the known one, BootstrapError
    when SSH or the script fails.
    """
    conn = connection(target)
    where = f"{target.user}@{target.host}:{target.port}"
    try:
        conn.open()
        _upload(conn, spec, payload, remote_dir)
        _run_script(conn, spec, remote_dir)
    except paramiko.BadHostKeyException:
        raise HostKeyError(f"node {spec.node}: {where} offered a host key that differs from "
                           f"the one in {target.known_hosts}") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(f"node {spec.node}: {where} is not in "
                               f"{target.known_hosts}; refusing an unknown host key") from None
        raise BootstrapError(f"node {spec.node}: SSH to {where} failed: {exc}") from None
    except (TimeoutError, OSError) as exc:
        raise BootstrapError(f"node {spec.node}: cannot reach {where}: {exc}") from None
    finally:
        conn.close()
    log.info("node %s: worker started on %s for pool %s", spec.node, target.host, spec.pool)


def _upload(conn: fabric.Connection, spec: WorkerSpec, payload: Path | None,
            remote_dir: str) -> None:
    quoted = shlex.quote(remote_dir)
    _run(conn, spec, f"mkdir -p {quoted}/payload && chmod 700 {quoted}", "make the directory")
    has_script = False
    if payload is not None:
        for path in sorted(p for p in payload.rglob("*") if p.is_file()):
            relative = path.relative_to(payload).as_posix()
            if "/" in relative:
                parent = shlex.quote(f"{remote_dir}/payload/{relative.rsplit('/', 1)[0]}")
                _run(conn, spec, f"mkdir -p {parent}", "make a payload directory")
            conn.put(str(path), f"{remote_dir}/payload/{relative}", preserve_mode=True)
            has_script = has_script or relative == SCRIPT_NAME
    script = (payload / SCRIPT_NAME).read_bytes() if payload and has_script else \
        DEFAULT_SCRIPT.encode()
    conn.put(io.BytesIO(script), f"{remote_dir}/{SCRIPT_NAME}")
    env = f"DISPATCH_BROKER_URL={shlex.quote(spec.broker_url)}\n".encode()
    conn.put(io.BytesIO(env), f"{remote_dir}/{ENV_NAME}")
    _run(conn, spec, f"chmod 600 {quoted}/{ENV_NAME} && chmod 700 {quoted}/{SCRIPT_NAME}",
         "protect the env file")


def _run_script(conn: fabric.Connection, spec: WorkerSpec, remote_dir: str) -> None:
    variables = {"DISPATCH_NODE_NAME": spec.node, "DISPATCH_POOL": spec.pool,
                 "DISPATCH_COMMAND": spec.dispatch,
                 "DISPATCH_WORKER_ARGS": " ".join(spec.worker_args)}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
    _run(conn, spec, f"{assignments} sh {shlex.quote(remote_dir)}/{SCRIPT_NAME}",
         "run the bootstrap script")


def _run(conn: fabric.Connection, spec: WorkerSpec, command: str, what: str) -> None:
    try:
        result = conn.run(command, hide=True, warn=True, pty=False)
    except invoke.exceptions.UnexpectedExit as exc:  # pragma: no cover - warn=True
        result = exc.result
    if result.exited != 0:
        detail = (result.stderr or result.stdout or "").strip()[-1000:]
        raise BootstrapError(f"node {spec.node}: could not {what} (exit {result.exited}): "
                             f"{detail}")
