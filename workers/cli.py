"""``dispatch worker``: start an execute node (registered through an entry point)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from pathlib import Path

import click

from dispatch.chunks import DEFAULT_MAX_RESULT_BYTES
from dispatch.config import DEFAULT_BROKER_URL
from dispatch.quantity import parse_size_mib
from workers.node import ExecuteNode, NodeConfig
from workers.nodebase import RUNNING_AFTER_S

log = logging.getLogger(__name__)

#: RabbitMQ 3.10 refuses a message body over 128 MiB.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024


@click.command("worker")
@click.option("--broker", envvar="DISPATCH_BROKER_URL", default=DEFAULT_BROKER_URL,
              show_envvar=True, help="AMQP URL of the broker.")
@click.option("--pool", "pools", multiple=True, metavar="POOL",
              help="Pool to serve (repeatable; default: default unless --queue is given).")
@click.option("--slots", type=click.IntRange(min=1), help="Jobs at once (default: cores).")
@click.option("--memory", help="Memory to offer, e.g. 16G (default: physical memory).")
@click.option("--exchange", help="Also serve a queue bound to this exchange (e.g. amq.direct).")
@click.option("--routing-key", help="Binding key for --queue (default: the queue name).")
@click.option("--queue", help="Queue to serve on --exchange (HTCondor's example: grid).")
@click.option("--workdir-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/tmp/dispatch"), show_default=True,  # noqa: S108
              help="Where each job's fresh working directory is made.")
@click.option("--user", default="nobody", show_default=True,
              help="Account jobs run as when the worker runs as root.")
@click.option("--group", "groups", multiple=True, metavar="LABEL",
              help="Label this node advertises in Groups (repeatable).")
@click.option("--name", help="Machine name to advertise (default: FQDN).")
@click.option("--kill-grace", type=float, default=5.0, show_default=True,
              help="Seconds between KillSig and SIGKILL.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, envvar="DISPATCH_NODE_HEARTBEAT_S", show_envvar=True,
              help="Seconds between node heartbeats; a claimed job's lease is three of them.")
@click.option("--running-after", type=click.FloatRange(min=0), default=RUNNING_AFTER_S,
              show_default=True, envvar="DISPATCH_RUNNING_AFTER_S", show_envvar=True,
              help="Seconds a job runs before its Running reply is sent; a job that ends "
              "sooner gets only its final reply (0: as each job starts).")
@click.option("--admin", "admins", multiple=True, metavar="USER", envvar="DISPATCH_ADMINS",
              show_envvar=True, help="Broker user whose control messages this node obeys "
              "besides its own (repeatable; the variable is comma-separated).")
@click.option("--max-result-bytes", type=click.IntRange(min=1024, max=MAX_MESSAGE_BYTES),
              default=DEFAULT_MAX_RESULT_BYTES, show_default=True,
              envvar="DISPATCH_MAX_RESULT_BYTES", show_envvar=True,
              help="Largest result zip sent as one reply; larger ones go in chunks of this "
              "size (RabbitMQ 4.x refuses messages over 16 MiB, 3.10 over 128 MiB).")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="DISPATCH_SPOOL_DIR", show_envvar=True,
              help="Where large results are zipped and undeliverable ones kept "
              "(default: WORKDIR_ROOT/.spool).")
@click.option("--ssh-hosts", type=click.Path(dir_okay=False, path_type=Path),
              envvar="DISPATCH_SSH_HOSTS", show_envvar=True,
              help="Run each job on one of the SSH hosts in this YAML file instead of here "
              "(no daemon on them; see docs/user-guide.md, Jobs on SSH hosts).")
@click.option("--ssh-address", metavar="HOST:PORT", envvar="DISPATCH_SSH_ADDRESS",
              show_envvar=True, help="Where other nodes of a multi-node job reach this "
              "node's sshd; with --ssh-authorized-keys, lets this node join such jobs.")
@click.option("--ssh-user", envvar="DISPATCH_SSH_USER", show_envvar=True,
              help="Account they log in as (default: the account jobs run as).")
@click.option("--ssh-authorized-keys", type=click.Path(dir_okay=False, path_type=Path),
              envvar="DISPATCH_SSH_AUTHORIZED_KEYS", show_envvar=True,
              help="authorized_keys file sshd reads for that account; the node adds and "
              "removes each multi-node job's key there.")
@click.option("--ssh-host-key", type=click.Path(dir_okay=False, path_type=Path),
              envvar="DISPATCH_SSH_HOST_KEY", show_envvar=True,
              help="The sshd's host public key (default /etc/ssh/ssh_host_ed25519_key.pub).")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty and jobs are done.")
@click.option("--describe", is_flag=True,
              help="Print the machine attributes Requirements see (JSON) and exit.")
def worker(broker: str, pools: tuple[str, ...], slots: int | None, memory: str | None,
           exchange: str | None, routing_key: str | None, queue: str | None,
           workdir_root: Path, user: str, groups: tuple[str, ...], name: str | None,
           kill_grace: float, heartbeat_interval: float, running_after: float,
           admins: tuple[str, ...],
           max_result_bytes: int, spool_dir: Path | None, ssh_hosts: Path | None,
           ssh_address: str | None, ssh_user: str | None, ssh_authorized_keys: Path | None,
           ssh_host_key: Path | None, burst: bool, describe: bool) -> None:
    """Run an execute node: take jobs from the pool queues and run them."""
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (exchange or routing_key) and not queue:
        raise click.UsageError("--exchange and --routing-key need --queue")
    try:
        memory_mb = parse_size_mib(memory) if memory else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory") from None
    config = NodeConfig(
        broker_url=broker,
        pools=pools or (() if queue else ("default",)),
        slots=slots,
        exchange=exchange,
        routing_key=routing_key,
        queue=queue,
        workdir_root=workdir_root,
        user=user if os.geteuid() == 0 else None,
        groups=groups,
        name=name,
        memory_mb=memory_mb,
        kill_grace_s=kill_grace,
        burst=burst,
        heartbeat_interval_s=heartbeat_interval,
        running_after_s=running_after,
        admins=tuple(a.strip() for value in admins for a in value.split(",") if a.strip()),
        max_result_bytes=max_result_bytes,
        spool_dir=spool_dir,
        ssh_address=ssh_address,
        ssh_user=ssh_user,
        ssh_authorized_keys=ssh_authorized_keys,
        ssh_host_key=ssh_host_key,
    )
    if ssh_address is not None and not ssh_address.rpartition(":")[2].isdecimal():
        raise click.BadParameter(f"{ssh_address!r} is not HOST:PORT", param_hint="--ssh-address")
    if ssh_hosts is not None:
        _serve_ssh_hosts(config, ssh_hosts, describe)
        return
    try:
        node = ExecuteNode(config)
    except KeyError:
        raise click.BadParameter(f"no such user {user!r}", param_hint="--user") from None
    if describe:
        click.echo(json.dumps(node.attrs, indent=2, sort_keys=True))
        return
    log.info("node %s: advertises %s", node.machine.name, json.dumps(node.attrs, sort_keys=True))
    node.install_signal_handlers()
    node.run()
    log.info("node %s: stopped after %d jobs", node.machine.name, node.jobs_done)


def _serve_ssh_hosts(config: NodeConfig, path: Path, describe: bool) -> None:
    """Run a node whose jobs run on the SSH hosts listed in ``path``."""
    # paramiko loads only for this mode: a plain worker stays small and quick to fork.
    from workers.sshhosts import HostsFileError, load_hosts  # noqa: PLC0415
    from workers.sshnode import SshHostsNode  # noqa: PLC0415

    try:
        hosts = load_hosts(path)
    except HostsFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--ssh-hosts") from None
    if config.name is None:
        config = dataclasses.replace(config, name=f"{socket.getfqdn()}-ssh")
    node = SshHostsNode(config, hosts)
    if describe:
        click.echo(json.dumps({link.name: link.attrs for link in node.pool.links}, indent=2,
                              sort_keys=True))
        return
    node.install_signal_handlers()
    node.run()
    log.info("node %s: stopped after %d jobs", node.machine.name, node.jobs_done)
