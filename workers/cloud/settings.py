"""Settings of the cloud plane, from ``DISPATCH_*`` variables, typed, in one place. Pure.

Bad values raise :class:`CloudConfigError` naming the variable.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.config import DEFAULT_BROKER_URL
from dispatch.quantity import parse_duration_s, parse_size_mib
from workers.cloud.errors import CloudConfigError

#: Variables the cloud plane reads, with what they mean (docs/cloud.md's table).
VARIABLES = {
    "DISPATCH_BROKER_URL": "AMQP URL of the broker (Celery's broker too)",
    "DISPATCH_CLOUDS_YAML": "path of the clouds.yaml to use (required; never looked up in cwd)",
    "DISPATCH_CLOUD": "cloud name in that clouds.yaml (default: dispatch)",
    "DISPATCH_LEDGER_URL": "ledger database URL; without it only lifetime and ERROR reaping runs",
    "DISPATCH_CLOUD_IMAGE": "image servers boot from",
    "DISPATCH_CLOUD_NETWORK": "network id servers attach to (default: the cloud's choice)",
    "DISPATCH_CLOUD_KEY_NAME": "Nova keypair name injected into servers",
    "DISPATCH_CLOUD_SERVER_GROUP": "policy of a per-pool server group (e.g. anti-affinity)",
    "DISPATCH_CLOUD_LIFETIME": "default lifetime of a server (default 1d)",
    "DISPATCH_CLOUD_BOOT_TIMEOUT": "delete a server whose worker never registered (default 15m)",
    "DISPATCH_CLOUD_IDLE_TIMEOUT": "drain a node with no job for this long (default 10m)",
    "DISPATCH_CLOUD_DRAIN_TIMEOUT": "delete a draining node after this long anyway (default 1h)",
    "DISPATCH_CLOUD_NOTICE": "warn this long before a lifetime ends (default 0: never)",
    "DISPATCH_CLOUD_BROKER_HEARTBEAT": "Celery's AMQP heartbeat in seconds (default 30; 0: off)",
    "DISPATCH_CLOUD_TASK_QUEUE": "queue the Celery tasks go through (default dispatch.cloud.tasks)",
    "DISPATCH_CLOUD_REAP_EVERY": "beat interval of reap (default 60s)",
    "DISPATCH_CLOUD_AUTOSCALE_EVERY": "beat interval of autoscale (default 0: off)",
    "DISPATCH_CLOUD_POOLS": "pools autoscale and multi-node job provisioning serve, "
    "comma-separated",
    "DISPATCH_CLOUD_GANGS": "boot servers for multi-node jobs of those pools short of nodes "
    "(1 or 0; default 1)",
    "DISPATCH_CLOUD_GANG_POLICY": "policy of a multi-node job's server group "
    "(default soft-anti-affinity)",
    "DISPATCH_CLOUD_GANG_SILENCE": "delete a gathering job's servers after this long without "
    "word from its head (default 10m)",
    "DISPATCH_CLOUD_GANG_QUEUE": "queue the cloud plane reads multi-node job events from "
    "(default dispatch.cloud.gangs)",
    "DISPATCH_CLOUD_MAX_NODES": "quota: servers at once (default 10)",
    "DISPATCH_CLOUD_MAX_CORES": "quota: vCPUs at once (default 64)",
    "DISPATCH_CLOUD_MAX_RAM": "quota: RAM at once (default 256G)",
    "DISPATCH_CLOUD_BAN_AFTER": "boot failures of a flavor or image before a ban (default 3)",
    "DISPATCH_CLOUD_BAN_FOR": "how long a ban lasts (default 1h)",
    "DISPATCH_CLOUD_STATE_DIR": "where boot failures are kept (default ~/.local/share/dispatch)",
    "DISPATCH_CLOUD_OWNER": "owner written on servers (default: the local user)",
    "DISPATCH_CLOUD_SSH_USER": "account bootstrap logs in as (default: root)",
    "DISPATCH_CLOUD_SSH_KEY": "private key file for bootstrap",
    "DISPATCH_CLOUD_SSH_PORT": "SSH port of servers (default 22)",
    "DISPATCH_CLOUD_KNOWN_HOSTS": "known_hosts file checked (and extended from console keys)",
    "DISPATCH_CLOUD_PAYLOAD": "directory copied to each server before its bootstrap script runs",
    "DISPATCH_CLOUD_REMOTE_DIR": "directory on servers for payload, env file and logs "
    "(default: dispatch-node, in the SSH user's home)",
    "DISPATCH_CLOUD_REMOTE_DISPATCH": "the dispatch command on servers (default: dispatch)",
    "DISPATCH_CLOUD_WORKER_ARGS": "extra `dispatch worker` arguments on servers",
    "DISPATCH_LEASE_CHECK_EVERY": "how often beat sends out jobs whose lease expired (needs "
    "DISPATCH_LEDGER_URL; 0 leaves it to `dispatch ledger`; default 5s)",
}


@dataclass(frozen=True)
class CloudSettings:
    """Everything the cloud plane needs; ``from_env`` reads it."""

    broker_url: str = DEFAULT_BROKER_URL
    clouds_yaml: Path | None = None
    cloud: str = "dispatch"
    ledger_url: str | None = None
    image: str | None = None
    network: str | None = None
    key_name: str | None = None
    server_group_policy: str | None = None
    lifetime_s: int = 86400
    boot_timeout_s: int = 900
    idle_timeout_s: int = 600
    drain_timeout_s: int = 3600
    notice_s: int = 0
    broker_heartbeat_s: int = 30
    task_queue: str = "dispatch.cloud.tasks"
    reap_every_s: int = 60
    autoscale_every_s: int = 0
    lease_check_every_s: int = 5
    pools: tuple[str, ...] = ()
    gangs: bool = True
    gang_policy: str = "soft-anti-affinity"
    gang_silence_s: int = 600
    gang_queue: str = "dispatch.cloud.gangs"
    max_nodes: int = 10
    max_cores: int = 64
    max_ram_mb: int = 256 * 1024
    ban_after: int = 3
    ban_for_s: int = 3600
    state_dir: Path = field(default_factory=lambda: Path.home() / ".local/share/dispatch")
    owner: str = "dispatch"
    ssh_user: str = "root"
    ssh_key: Path | None = None
    ssh_port: int = 22
    known_hosts: Path | None = None
    payload: Path | None = None
    remote_dir: str = "dispatch-node"
    remote_dispatch: str = "dispatch"
    worker_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CloudSettings:
        """Return settings from the environment; raise CloudConfigError on a bad value."""
        env = os.environ if environ is None else environ
        get = _Reader(env)
        return cls(
            broker_url=get.text("DISPATCH_BROKER_URL") or DEFAULT_BROKER_URL,
            clouds_yaml=get.path("DISPATCH_CLOUDS_YAML"),
            cloud=get.text("DISPATCH_CLOUD") or "dispatch",
            ledger_url=get.text("DISPATCH_LEDGER_URL"),
            image=get.text("DISPATCH_CLOUD_IMAGE"),
            network=get.text("DISPATCH_CLOUD_NETWORK"),
            key_name=get.text("DISPATCH_CLOUD_KEY_NAME"),
            server_group_policy=get.text("DISPATCH_CLOUD_SERVER_GROUP"),
            lifetime_s=get.duration("DISPATCH_CLOUD_LIFETIME", 86400),
            boot_timeout_s=get.duration("DISPATCH_CLOUD_BOOT_TIMEOUT", 900),
            idle_timeout_s=get.duration("DISPATCH_CLOUD_IDLE_TIMEOUT", 600),
            drain_timeout_s=get.duration("DISPATCH_CLOUD_DRAIN_TIMEOUT", 3600),
            notice_s=get.duration("DISPATCH_CLOUD_NOTICE", 0),
            broker_heartbeat_s=get.integer("DISPATCH_CLOUD_BROKER_HEARTBEAT", 30),
            task_queue=get.text("DISPATCH_CLOUD_TASK_QUEUE") or "dispatch.cloud.tasks",
            reap_every_s=get.duration("DISPATCH_CLOUD_REAP_EVERY", 60),
            autoscale_every_s=get.duration("DISPATCH_CLOUD_AUTOSCALE_EVERY", 0),
            lease_check_every_s=get.duration("DISPATCH_LEASE_CHECK_EVERY", 5),
            pools=tuple(p.strip() for p in (get.text("DISPATCH_CLOUD_POOLS") or "").split(",")
                        if p.strip()),
            gangs=get.integer("DISPATCH_CLOUD_GANGS", 1) > 0,
            gang_policy=get.text("DISPATCH_CLOUD_GANG_POLICY") or "soft-anti-affinity",
            gang_silence_s=get.duration("DISPATCH_CLOUD_GANG_SILENCE", 600),
            gang_queue=get.text("DISPATCH_CLOUD_GANG_QUEUE") or "dispatch.cloud.gangs",
            max_nodes=get.integer("DISPATCH_CLOUD_MAX_NODES", 10),
            max_cores=get.integer("DISPATCH_CLOUD_MAX_CORES", 64),
            max_ram_mb=get.size("DISPATCH_CLOUD_MAX_RAM", 256 * 1024),
            ban_after=get.integer("DISPATCH_CLOUD_BAN_AFTER", 3),
            ban_for_s=get.duration("DISPATCH_CLOUD_BAN_FOR", 3600),
            state_dir=get.path("DISPATCH_CLOUD_STATE_DIR")
            or Path.home() / ".local/share/dispatch",
            owner=get.text("DISPATCH_CLOUD_OWNER") or getpass.getuser(),
            ssh_user=get.text("DISPATCH_CLOUD_SSH_USER") or "root",
            ssh_key=get.path("DISPATCH_CLOUD_SSH_KEY"),
            ssh_port=get.integer("DISPATCH_CLOUD_SSH_PORT", 22),
            known_hosts=get.path("DISPATCH_CLOUD_KNOWN_HOSTS"),
            payload=get.path("DISPATCH_CLOUD_PAYLOAD"),
            remote_dir=get.text("DISPATCH_CLOUD_REMOTE_DIR") or "dispatch-node",
            remote_dispatch=get.text("DISPATCH_CLOUD_REMOTE_DISPATCH") or "dispatch",
            worker_args=tuple((get.text("DISPATCH_CLOUD_WORKER_ARGS") or "").split()),
        )

    def require_clouds_yaml(self) -> Path:
        """Return the clouds.yaml path, or raise CloudConfigError when it is not set."""
        if self.clouds_yaml is None:
            raise CloudConfigError("DISPATCH_CLOUDS_YAML is not set: give the clouds.yaml path")
        return self.clouds_yaml


class _Reader:
    """Reads typed values from an environment, naming the variable in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        return self.env.get(name) or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return Path(value).expanduser() if value else None

    def integer(self, name: str, default: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise CloudConfigError(f"{name}: not a whole number: {value!r}") from None
        if number < 0:
            raise CloudConfigError(f"{name}: must not be negative: {value!r}")
        return number

    def duration(self, name: str, default: int) -> int:
        value = self.text(name)
        try:
            return default if value is None else parse_duration_s(value)
        except ValueError as exc:
            raise CloudConfigError(f"{name}: {exc}") from None

    def size(self, name: str, default: int) -> int:
        value = self.text(name)
        try:
            return default if value is None else parse_size_mib(value)
        except ValueError as exc:
            raise CloudConfigError(f"{name}: {exc}") from None
