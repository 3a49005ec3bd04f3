"""A multi-node job's plan, as its head node writes it for the gang driver (workers/gang.py).

Pure data and JSON: the node writes it into a file outside the job's working directory
(mode 0600); the driver reads it. No secret is in it: the broker URL travels in the
driver's environment only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

#: Where the driver finds the node's broker URL (its environment; never a file).
BROKER_ENV = "DISPATCH_GANG_BROKER"
PAYLOAD = ".dispatch-payload.tar"
HEAD_COPYBACK = ".dispatch-copyback"


@dataclasses.dataclass(frozen=True)
class SshAccess:
    """How other nodes of a job reach one node's sshd."""

    host: str
    port: int
    user: str
    host_key: str
    #: The authorized_keys file the node manages (only the head's driver edits it).
    keys_file: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the head node tells the driver (a JSON file outside the working directory)."""

    job_id: str
    attempt: int
    pool: str
    head: str
    workdir: str
    keydir: str
    reason_file: str
    min_nodes: int
    max_nodes: int
    gather_s: int
    bootstrap: str | None
    cleanup: str | None
    argv: list[str]
    env: dict[str, str]
    stdout: str
    stderr: str
    cpus: int
    memory_mb: int
    disk_mb: int
    requirements: str
    uid: int | None = None
    gid: int | None = None
    head_ssh: SshAccess | None = None
    kill_grace_s: float = 5.0

    def dump(self, path: Path) -> None:
        """Write the plan as JSON, readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(dataclasses.asdict(self), out)

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read a plan written by :meth:`dump`."""
        data = json.loads(path.read_text(encoding="utf-8"))
        ssh = data.pop("head_ssh", None)
        return cls(**data, head_ssh=SshAccess(**ssh) if ssh else None)


class GangFailed(Exception):
    """Ends the job with a reason: a node lost, a stage failed, the job stopped."""

    def __init__(self, reason: str, code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
