"""The job model: what a user asks for, and what comes back. Pure: no I/O, no kombu."""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from dispatch.topology import DEFAULT_POOL, ReplyAddress

DEFAULT_OUT = "job.out"
DEFAULT_ERR = "job.err"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_PRIORITY = 4


class JobState(enum.StrEnum):
    """A job's state as it travels in the ``JobState`` header."""

    IDLE = "Idle"
    RUNNING = "Running"
    REMOVED = "Removed"
    EXITED = "Exited"
    HELD = "Held"
    REJECTED = "Rejected"

    @property
    def status(self) -> int:
        """Return HTCondor's numeric ``JobStatus`` for this state."""
        return _STATUS[self]

    @property
    def is_final(self) -> bool:
        """Tell whether no further reply follows this one."""
        return self in (JobState.EXITED, JobState.REJECTED, JobState.REMOVED)


_STATUS = {
    JobState.IDLE: 1,
    JobState.RUNNING: 2,
    JobState.REMOVED: 3,
    JobState.EXITED: 4,
    JobState.HELD: 5,
    JobState.REJECTED: 4,
}


def signal_number(value: str | int) -> int:
    """Return the number of a signal given as ``SIGTERM``, ``TERM``, ``15`` or 15.

    Raises ValueError for anything that is not a signal on this platform.
    """
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        try:
            signal.Signals(number)
        except ValueError:
            raise ValueError(f"no signal numbered {number}") from None
        return number
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


@dataclass(frozen=True)
class Resources:
    """What a job needs of a node: slots (cores), memory and scratch disk in MiB."""

    cpus: int = 1
    memory_mb: int = 0
    disk_mb: int = 0


@dataclass(frozen=True)
class JobSpec:
    """A job as a user describes it, before it becomes a message.

    ``inputs`` are local paths shipped in the message body; ``stdin`` names one of
    them (HTCondor's ``In``). ``time_limit_s`` of ``None`` means no limit.
    """

    command: str
    arguments: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    inputs: tuple[Path, ...] = ()
    stdin: str | None = None
    stdout: str = DEFAULT_OUT
    stderr: str = DEFAULT_ERR
    resources: Resources = Resources()
    time_limit_s: int | None = None
    kill_signal: int = int(signal.SIGTERM)
    requirements: str = "TRUE"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    priority: int = DEFAULT_PRIORITY
    pool: str = DEFAULT_POOL
    name: str | None = None
    job_id: str | None = None
    array: ArrayPlace | None = None
    notify: Notify | None = None
    stages: Stages | None = None
    nodes: Nodes | None = None
    #: False: never rerouted to a fallback pool (``NoFallback``), it waits for its own.
    fallback: bool = True


DEFAULT_GATHER_S = 10


@dataclass(frozen=True)
class Nodes:
    """A job that spans several execute nodes (openstack-queue's three-stage job).

    The node that takes the job (the head) gathers between ``min`` and ``max`` nodes,
    itself included, each meeting the job's RequestCpus/RequestMemory/Requirements; it
    starts once ``min`` are held and, past that, waits up to ``gather_s`` more for
    ``max``. ``bootstrap`` runs on every node after the payload is copied, the job's
    command (the execute stage) on the head with ``$DISPATCH_HOSTFILE``, then
    ``cleanup`` on every node; what cleanup leaves in ``$DISPATCH_COPYBACK`` comes back
    as one archive per node.
    """

    min: int = 1
    max: int = 1
    bootstrap: str | None = None
    cleanup: str | None = None
    gather_s: int = DEFAULT_GATHER_S


@dataclass(frozen=True)
class Stages:
    """What a node does around a job's command: fetch, set up, hook, select output.

    ``source`` is a git URL fetched into the working directory (``ref``: a branch, tag
    or commit; the remote's HEAD when None). ``setup`` are shell lines run in order
    before the command; ``pre_modules``/``post_modules`` name executables the operator
    installed on the node, run before and after; ``output`` are globs naming what comes
    back (everything when empty). A job without any of these has no Stages at all.
    """

    source: str | None = None
    ref: str | None = None
    setup: tuple[str, ...] = ()
    output: tuple[str, ...] = ()
    pre_modules: tuple[str, ...] = ()
    post_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArrayPlace:
    """Where a job sits in an array (``submit --array N``): shared id, index, size."""

    array_id: str
    index: int
    size: int


NOTIFY_WHEN = ("Always", "Complete", "Error", "Never")


@dataclass(frozen=True)
class Notify:
    """Who hears of a job's state changes (HTCondor's notify_user and notification)."""

    email: str | None = None
    url: str | None = None
    when: str = "Complete"


@dataclass(frozen=True)
class JobRequest:
    """A job message as an execute node understands it, decoded and validated."""

    job_id: str
    spec: JobSpec
    reply_to: ReplyAddress | None
    correlation_id: str
    owner: str | None = None
    classad_quoted: bool = False
    attempt: int = 1


@dataclass(frozen=True)
class JobUpdate:
    """One reply about a job: a status update, or the final result with its archive."""

    job_id: str
    state: JobState
    host: str | None = None
    started_at: str | None = None
    exit_code: int | None = None
    exit_by_signal: bool = False
    exit_signal: int | None = None
    duration_s: float | None = None
    reason: str | None = None
    attempt: int = 1
    archive: bytes = b""
    headers: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_final(self) -> bool:
        """Tell whether this is the job's last reply."""
        return self.state.is_final

    @property
    def shell_status(self) -> int:
        """Return the job's outcome as a shell would: the exit code, or 128 + signal."""
        if self.exit_by_signal and self.exit_signal is not None:
            return 128 + self.exit_signal
        return self.exit_code if self.exit_code is not None else 1
