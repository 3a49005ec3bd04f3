"""The wire contract of multi-node jobs: node tokens, joined notices, gang queues. Pure.

A multi-node job (``MinNodes``/``MaxNodes``, :class:`dispatch.job.Nodes`) is taken by one
node like any job: the *head*. The head's gang driver (workers/gang.py) then asks its
pool for more nodes by publishing ``MaxNodes - 1`` **node tokens** to the pool, as jobs
are published (same exchange, routing key and priority high), so an idle node takes one
with no scheduler in the path and the cloud plane sees them as queued work:

- properties: ``message_id`` ``<job id>.node<k>``, ``content_type``
  ``application/octet-stream``, an empty body, persistent;
- headers: ``GangOf`` (the job id), ``GangInbox`` (the head's gang inbox queue),
  ``GangKey`` (the job's SSH public key, made for this job), ``GangHead`` (the head's
  node name), and the job's ``RequestCpus``/``RequestMemory``/``RequestDisk``/
  ``Requirements``, which a node must meet to join.

A node that takes a token and meets it holds those resources, authorizes ``GangKey`` for
its SSH user, declares an exclusive **hold queue** (``dispatch.gang.<job>.<node>``: it
lives exactly as long as the member's connection) and sends a **joined notice** (msgpack)
to ``GangInbox`` on the default exchange, mandatory; it acks the token once the notice is
routed. It serves the job until the head releases it (control op ``gang-release`` to
``node.<member>.gang-release``) or the inbox is gone (the head ended): then it revokes the
key, frees the resources and removes the job's directory. A member lost before the job
starts is replaced by a new token; one lost after fails the job.
The inbox and the hold queues are exclusive, so each side sees the other vanish when its
process or connection dies: a passive declare answers RESOURCE_LOCKED while the owner
lives and NOT_FOUND once it is gone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from dispatch.errors import InvalidMessageError

GANG_OF = "GangOf"
GANG_INBOX = "GangInbox"
GANG_KEY = "GangKey"
GANG_HEAD = "GangHead"
#: Headers of the job a token carries over, so the joining node meets them.
CARRIED = ("RequestCpus", "RequestMemory", "RequestDisk", "Requirements")
#: Marks the authorized_keys lines a node adds for gangs: ``dispatch-gang:<job id>``.
KEY_COMMENT = "dispatch-gang:"
_KEY_LINE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp256|ssh-rsa) [A-Za-z0-9+/=]{16,800}$")


def is_token(raw_headers: Mapping[str, Any] | None) -> bool:
    """Tell whether a message taken from a pool queue is a node token, not a job."""
    return bool(raw_headers) and GANG_OF in raw_headers  # type: ignore[operator]


def token_id(job_id: str, k: int) -> str:
    """Return the message id of the ``k``-th node token of ``job_id`` (1-based)."""
    return f"{job_id}.node{k}"


def inbox_queue(job_id: str) -> str:
    """Return the head's gang inbox: exclusive to its driver's connection."""
    return f"dispatch.gang.{job_id}"


def hold_queue(job_id: str, node: str) -> str:
    """Return a member's hold queue: exclusive to the member node's connection."""
    return f"dispatch.gang.{job_id}.{node}"


@dataclass(frozen=True)
class Token:
    """A node token as a node reads it."""

    job_id: str
    token_id: str
    inbox: str
    key: str
    head: str


def read_token(properties: Mapping[str, Any], raw_headers: Mapping[str, Any]) -> Token:
    """Return the token a message carries; raise InvalidMessageError naming the bad field."""
    def text(name: str, limit: int = 255) -> str:
        value = raw_headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str) or not value or len(value) > limit:
            raise InvalidMessageError(f"must be a string of 1-{limit} characters", field=name)
        return value

    key = text(GANG_KEY, 1000)
    if not _KEY_LINE.match(key):
        raise InvalidMessageError("is not an OpenSSH public key line", field=GANG_KEY)
    job_id = text(GANG_OF)
    inbox = text(GANG_INBOX)
    if inbox != inbox_queue(job_id):
        raise InvalidMessageError(f"must be {inbox_queue(job_id)!r}", field=GANG_INBOX)
    return Token(job_id=job_id, token_id=str(properties.get("message_id") or job_id),
                 inbox=inbox, key=key, head=text(GANG_HEAD))


@dataclass(frozen=True)
class Member:
    """A node that joined a gang: how the head reaches it over SSH, and what it gives."""

    node: str
    token_id: str
    ssh_host: str
    ssh_port: int
    ssh_user: str
    host_key: str
    cpus: int
    workdir: str
    hold_queue: str

    def encode(self) -> bytes:
        """Return the joined notice's msgpack body."""
        packed: bytes = msgpack.packb({"op": "joined", **self.__dict__}, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, body: bytes) -> Member:
        """Read a joined notice; raise InvalidMessageError if it is not one."""
        try:
            data = msgpack.unpackb(body, raw=False)
            fields = {name: data[name] for name in cls.__dataclass_fields__}
            member = cls(**fields)
            if data.get("op") != "joined" or not isinstance(member.ssh_port, int) or \
                    not isinstance(member.cpus, int):
                raise ValueError("not a joined notice")
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise InvalidMessageError(f"not a joined notice: {exc}", field="body") from None
        return member


def hostfile_line(alias: str, slots: int) -> str:
    """Return one line of a hostfile in the format ``mpirun --hostfile`` reads."""
    return f"{alias} slots={slots}\n"
