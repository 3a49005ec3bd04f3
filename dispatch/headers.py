"""The header codec: HTCondor ClassAd attribute names on AMQP messages, both ways.

Every wire name is spelled here and nowhere else. Pure: no I/O, no kombu.
Strings may arrive ClassAd-quoted (``"\\"/bin/echo\\""``); they are unquoted on the
way in, and a request that used quoting gets quoted strings in its replies, so
listeners written for HTCondor's low-latency feature work unchanged.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from dispatch import schema
from dispatch.errors import InvalidMessageError
from dispatch.job import (
    DEFAULT_ERR,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OUT,
    ArrayPlace,
    JobRequest,
    JobSpec,
    JobState,
    JobUpdate,
    Nodes,
    Notify,
    Resources,
    Stages,
    signal_number,
)
from dispatch.topology import DEFAULT_POOL, ReplyAddress

# Request attributes.
CMD = "Cmd"
ARGUMENTS = "Arguments"
ENVIRONMENT = "Environment"
IN = "In"
OUT = "Out"
ERR = "Err"
REQUEST_CPUS = "RequestCpus"
REQUEST_MEMORY = "RequestMemory"
REQUEST_DISK = "RequestDisk"
TIME_LIMIT = "TimeLimit"
KILL_SIG = "KillSig"
REQUIREMENTS = "Requirements"
MAX_ATTEMPTS = "MaxAttempts"
JOB_NAME = "JobName"
ARRAY_ID = "ArrayId"  # jobs of one `submit --array N` share it
ARRAY_INDEX = "ArrayIndex"  # 0 .. ArraySize-1
ARRAY_SIZE = "ArraySize"
NOTIFY_USER = "NotifyUser"  # e-mail address for state-change notices (HTCondor's notify_user)
NOTIFY_URL = "NotifyUrl"  # webhook receiving a JSON POST per notice
NOTIFICATION = "Notification"  # Always | Complete | Error | Never (default Complete)
# Staged jobs (schemas/README.md, "Jobs from a repository"): without these, none of it runs.
SOURCE_URL = "SourceUrl"  # git URL fetched into the working directory before anything runs
SOURCE_REF = "SourceRef"  # branch, tag or commit of SourceUrl (default: the remote's HEAD)
SETUP_STEPS = "SetupSteps"  # shell lines run in order before Cmd; a string: one per line
TRANSFER_OUTPUT = "TransferOutput"  # globs of what comes back; a string: comma-separated
PRE_MODULES = "PreModules"  # node-installed hooks run before the job; a string: comma-separated
POST_MODULES = "PostModules"  # ... and after it
# Multi-node jobs (schemas/README.md, "Multi-node jobs"): without these, one node runs it.
MIN_NODES = "MinNodes"  # nodes that must be held before the job starts (the head included)
MAX_NODES = "MaxNodes"  # nodes the head aims for (default MinNodes)
BOOTSTRAP_SCRIPT = "BootstrapScript"  # shell script run on every node before the command
CLEANUP_SCRIPT = "CleanupScript"  # ... and after it; what it puts in $DISPATCH_COPYBACK returns
GATHER_TIME = "GatherTime"  # seconds to wait for MaxNodes once MinNodes are held (default 10)
# Fallback pools (schemas/README.md, "Fallback pools"): read by the ledger, never by a node.
NO_FALLBACK = "NoFallback"  # true: the job waits for its own pool, never rerouted
FALLBACK_FROM = "FallbackFrom"  # set by the ledger: the pool a rerouted job was taken from
# Both directions.
JOB_ID = "JobId"
ATTEMPT = "Attempt"
# Reply attributes.
JOB_STATUS = "JobStatus"
JOB_STATE = "JobState"
REMOTE_HOST = "RemoteHost"
STARTED_AT = "StartedAt"
EXIT_CODE = "ExitCode"
EXIT_BY_SIGNAL = "ExitBySignal"
EXIT_SIGNAL = "ExitSignal"
JOB_DURATION = "JobDuration"
REASON = "Reason"
HOLD_REASON = "HoldReason"
ATTRIBUTE = "Attribute"  # names the attribute a chirp reply sets (its value is under that name)
# Large results (schemas/README.md, "Large results"): chunk messages carry no JobState.
RESULT_CHUNK = "ResultChunk"  # 0-based index of a chunk message
RESULT_CHUNKS = "ResultChunks"  # how many chunks; on every chunk and on the final reply
RESULT_OFFSET = "ResultOffset"  # byte offset of a chunk in the archive
RESULT_BYTES = "ResultBytes"  # size of the whole archive, on the final reply
RESULT_SHA256 = "ResultSha256"  # hex SHA-256 of the whole archive, on the final reply

MAX_HEADER_CHARS = 65536


def unquote(value: str) -> tuple[str, bool]:
    """Return ``value`` without ClassAd string quotes, and whether it had them."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        if _BARE_QUOTE.search(inner):  # an expression such as "a" == "b", not one string
            return value, False
        return inner.replace('\\"', '"').replace("\\\\", "\\"), True
    return value, False


_BARE_QUOTE = re.compile(r'(?<!\\)(?:\\\\)*"')


def quote(value: str) -> str:
    """Return ``value`` as a ClassAd string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def normalize(raw: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return headers as plain JSON-like values, and whether any string was ClassAd-quoted.

    Raises InvalidMessageError for values no producer could have meant (undecodable
    bytes, oversized strings).
    """
    out: dict[str, Any] = {}
    quoted = False
    for name, value in raw.items():
        plain, was_quoted = _plain(name, value)
        quoted = quoted or was_quoted
        out[name] = plain
    return out, quoted


def _plain(name: str, value: Any) -> tuple[Any, bool]:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessageError("is not UTF-8 text", field=name) from None
    if isinstance(value, str):
        if len(value) > MAX_HEADER_CHARS:
            raise InvalidMessageError(f"is longer than {MAX_HEADER_CHARS} characters", field=name)
        return unquote(value)
    if isinstance(value, Decimal):
        return float(value), False
    if isinstance(value, list | tuple):
        items = [_plain(name, item) for item in value]
        return [item for item, _ in items], any(q for _, q in items)
    if isinstance(value, Mapping):
        table, quoted = normalize(value)
        return table, quoted
    if isinstance(value, bool | int | float) or value is None:
        return value, False
    return str(value), False


@dataclass(frozen=True)
class Envelope:
    """What a reply needs from a request, known even when its headers are bad."""

    job_id: str
    reply_to: ReplyAddress | None
    correlation_id: str
    owner: str | None
    classad_quoted: bool
    attempt: int = 1


def envelope(properties: Mapping[str, Any], raw_headers: Mapping[str, Any]) -> Envelope:
    """Return the reply envelope of a request; never raises on bad headers."""
    quoted = any(isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"'
                 for v in raw_headers.values())
    # A job id travels back as a reply's message_id, an AMQP short string.
    header_id = _text(raw_headers.get(JOB_ID))
    if header_id and len(header_id.encode("utf-8", "surrogatepass")) > 255:
        header_id = None
    job_id = properties.get("message_id") or header_id or str(uuid.uuid4())
    reply: ReplyAddress | None = None
    reply_to = properties.get("reply_to")
    if reply_to:
        try:
            reply = ReplyAddress.parse(str(reply_to))
        except ValueError:
            reply = None
    return Envelope(
        job_id=str(job_id),
        reply_to=reply,
        correlation_id=str(properties.get("correlation_id") or job_id),
        owner=properties.get("user_id") or None,
        classad_quoted=quoted,
        attempt=_positive_int(raw_headers.get(ATTEMPT)),
    )


def _positive_int(value: Any) -> int:
    """Return a count from an int or digit string header; 1 for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = _text(value)
    # isdecimal, not isdigit: "²" is a digit int() refuses; 12 digits keep int() cheap.
    if text and len(text) <= 12 and text.isascii() and text.isdecimal() and int(text) > 0:
        return int(text)
    return 1


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value:
        return unquote(value)[0]
    return None


def decode_request(
    properties: Mapping[str, Any], raw_headers: Mapping[str, Any], env: Envelope | None = None
) -> JobRequest:
    """Decode and validate a job message; raise InvalidMessageError naming the field at fault."""
    env = env or envelope(properties, raw_headers)
    headers, quoted = normalize(raw_headers)
    props = {k: v for k, v in properties.items() if k in _CHECKED_PROPERTIES and v is not None}
    schema.validate(schema.JOB_REQUEST, {"properties": props, "headers": headers},
                    InvalidMessageError)
    if properties.get("reply_to") and env.reply_to is None:
        raise InvalidMessageError("is not a queue name or /exchange/NAME/KEY", field="reply_to")
    spec = _spec(headers, env.job_id, properties.get("priority"))
    return JobRequest(
        job_id=env.job_id,
        spec=spec,
        reply_to=env.reply_to,
        correlation_id=env.correlation_id,
        owner=env.owner,
        classad_quoted=quoted or env.classad_quoted,
        attempt=env.attempt,
    )


_CHECKED_PROPERTIES = ("message_id", "reply_to", "correlation_id", "priority", "user_id",
                       "expiration", "content_type")


def _spec(h: Mapping[str, Any], job_id: str, priority: Any) -> JobSpec:
    time_limit = int(h.get(TIME_LIMIT, 0))
    return JobSpec(
        command=h[CMD],
        arguments=_arguments(h.get(ARGUMENTS)),
        environment=_environment(h.get(ENVIRONMENT)),
        stdin=h.get(IN),
        stdout=h.get(OUT, DEFAULT_OUT),
        stderr=h.get(ERR, DEFAULT_ERR),
        resources=Resources(
            cpus=int(h.get(REQUEST_CPUS, 1)),
            memory_mb=int(h.get(REQUEST_MEMORY, 0)),
            disk_mb=int(h.get(REQUEST_DISK, 0)),
        ),
        time_limit_s=time_limit or None,
        kill_signal=_kill_signal(h.get(KILL_SIG, "SIGTERM")),
        requirements=h.get(REQUIREMENTS) or "TRUE",
        max_attempts=int(h.get(MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS)),
        priority=int(priority) if isinstance(priority, int) else 0,
        pool=DEFAULT_POOL,
        name=h.get(JOB_NAME),
        job_id=job_id,
        array=_array_place(h),
        notify=_notify(h),
        stages=_stages(h) if not _STAGE_HEADERS.isdisjoint(h) else None,
        nodes=_nodes(h) if not _NODE_HEADERS.isdisjoint(h) else None,
        fallback=not is_true(h.get(NO_FALLBACK)),
    )


def is_true(value: Any) -> bool:
    """Tell whether a boolean header is true: ``true`` typed, or the text true (any case)."""
    if isinstance(value, str):
        return unquote(value)[0].strip().lower() == "true"
    return value is True


_NODE_HEADERS = frozenset({MIN_NODES, MAX_NODES, BOOTSTRAP_SCRIPT, CLEANUP_SCRIPT, GATHER_TIME})


def _nodes(h: Mapping[str, Any]) -> Nodes:
    # The gang driver (workers/gang.py) runs neither staged headers nor stdin: say so
    # rather than run the job without them.
    for name in (*sorted(_STAGE_HEADERS & h.keys()), *([IN] if IN in h else [])):
        raise InvalidMessageError("is not supported with MinNodes/MaxNodes (a multi-node "
                                  "job's stages are BootstrapScript, Cmd, CleanupScript)",
                                  field=name)
    low = int(h.get(MIN_NODES, 1))
    high = int(h.get(MAX_NODES, low))
    if low < 1:
        raise InvalidMessageError("must be at least 1", field=MIN_NODES)
    if high < low:
        raise InvalidMessageError(f"{high} is less than MinNodes ({low})", field=MAX_NODES)
    return Nodes(min=low, max=high, bootstrap=h.get(BOOTSTRAP_SCRIPT) or None,
                 cleanup=h.get(CLEANUP_SCRIPT) or None,
                 gather_s=int(h.get(GATHER_TIME, Nodes.gather_s)))


_STAGE_HEADERS = frozenset({SOURCE_URL, SOURCE_REF, SETUP_STEPS, TRANSFER_OUTPUT, PRE_MODULES,
                            POST_MODULES})


def _stages(h: Mapping[str, Any]) -> Stages:
    if SOURCE_REF in h and SOURCE_URL not in h:
        raise InvalidMessageError(f"needs {SOURCE_URL}: a ref of what?", field=SOURCE_REF)
    setup = h.get(SETUP_STEPS) or ()
    if isinstance(setup, str):
        setup = [line for line in setup.splitlines() if line.strip()]
    output = _list(h, TRANSFER_OUTPUT)
    for glob in output:
        if glob.startswith("/") or ".." in glob.split("/") or "\0" in glob:
            raise InvalidMessageError(f"{glob!r} is not inside the working directory",
                                      field=TRANSFER_OUTPUT)
    return Stages(source=h.get(SOURCE_URL), ref=h.get(SOURCE_REF),
                  setup=tuple(str(step) for step in setup), output=output,
                  pre_modules=_list(h, PRE_MODULES), post_modules=_list(h, POST_MODULES))


def _list(h: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """Return a list header given as an array or as a comma-separated string."""
    value = h.get(name) or ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def _array_place(h: Mapping[str, Any]) -> ArrayPlace | None:
    if ARRAY_ID not in h:
        return None
    return ArrayPlace(str(h[ARRAY_ID]), int(h.get(ARRAY_INDEX, 0)), int(h.get(ARRAY_SIZE, 1)))


def _notify(h: Mapping[str, Any]) -> Notify | None:
    if NOTIFY_USER not in h and NOTIFY_URL not in h:
        return None
    return Notify(h.get(NOTIFY_USER), h.get(NOTIFY_URL), str(h.get(NOTIFICATION, "Complete")))


def _arguments(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(str(item) for item in value)
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise InvalidMessageError(f"cannot be split like a shell line: {exc}",
                                  field=ARGUMENTS) from None


def _environment(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): _env_value(v) for k, v in value.items()}
    pairs: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise InvalidMessageError(f"{item.strip()!r} is not NAME=VALUE", field=ENVIRONMENT)
        pairs[name] = text
    return pairs


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _kill_signal(value: Any) -> int:
    try:
        return signal_number(value)
    except ValueError as exc:
        raise InvalidMessageError(str(exc), field=KILL_SIG) from None


def encode_request(spec: JobSpec) -> dict[str, Any]:
    """Return the headers of a job message for ``spec`` (typed values, never quoted).

    Attributes at their default are left out, so messages stay small.
    """
    res = spec.resources
    candidates: list[tuple[str, Any, Any]] = [
        (ARGUMENTS, list(spec.arguments), []),
        (ENVIRONMENT, dict(spec.environment), {}),
        (IN, spec.stdin, None),
        (OUT, spec.stdout, DEFAULT_OUT),
        (ERR, spec.stderr, DEFAULT_ERR),
        (REQUEST_CPUS, res.cpus, 1),
        (REQUEST_MEMORY, res.memory_mb, 0),
        (REQUEST_DISK, res.disk_mb, 0),
        (TIME_LIMIT, spec.time_limit_s, None),
        (KILL_SIG, spec.kill_signal, 15),
        (REQUIREMENTS, spec.requirements, "TRUE"),
        (MAX_ATTEMPTS, spec.max_attempts, DEFAULT_MAX_ATTEMPTS),
        (JOB_NAME, spec.name, None),
        (NO_FALLBACK, not spec.fallback, False),
    ]
    if spec.array is not None:
        candidates += [(ARRAY_ID, spec.array.array_id, None),
                       (ARRAY_INDEX, spec.array.index, None), (ARRAY_SIZE, spec.array.size, None)]
    if spec.stages is not None:
        st = spec.stages
        candidates += [(SOURCE_URL, st.source, None), (SOURCE_REF, st.ref, None),
                       (SETUP_STEPS, list(st.setup), []), (TRANSFER_OUTPUT, list(st.output), []),
                       (PRE_MODULES, list(st.pre_modules), []),
                       (POST_MODULES, list(st.post_modules), [])]
    if spec.nodes is not None:
        nd = spec.nodes
        candidates += [(MIN_NODES, nd.min, None), (MAX_NODES, nd.max, None),
                       (BOOTSTRAP_SCRIPT, nd.bootstrap, None), (CLEANUP_SCRIPT, nd.cleanup, None),
                       (GATHER_TIME, nd.gather_s, Nodes.gather_s)]
    if spec.notify is not None:
        candidates += [(NOTIFY_USER, spec.notify.email, None), (NOTIFY_URL, spec.notify.url, None),
                       (NOTIFICATION, spec.notify.when, None)]
    headers: dict[str, Any] = {CMD: spec.command}
    headers.update((name, value) for name, value, default in candidates if value != default)
    return headers


def reply_headers(state: JobState, env: Envelope, **fields: Any) -> dict[str, Any]:
    """Return the headers of a reply in ``state``; ``fields`` use Python names.

    Accepted fields: host, started_at, exit_code, exit_by_signal, exit_signal,
    duration_s, reason, hold_reason, attempt, and ``attribute=(name, value)`` for an
    attribute a running job published. Strings are ClassAd-quoted when the request was.
    """
    headers: dict[str, Any] = {
        JOB_ID: env.job_id,
        JOB_STATUS: state.status,
        JOB_STATE: state.value,
        ATTEMPT: fields.pop("attempt", None) or env.attempt,
    }
    attribute = fields.pop("attribute", None)
    if attribute is not None:
        headers[ATTRIBUTE] = attribute[0]
        headers[attribute[0]] = attribute[1]
    for name, value in fields.items():
        if value is not None:
            headers[_REPLY_FIELDS[name]] = value
    if env.classad_quoted:
        headers = {k: quote(v) if isinstance(v, str) else v for k, v in headers.items()}
    return headers


_REPLY_FIELDS = {
    "host": REMOTE_HOST,
    "started_at": STARTED_AT,
    "exit_code": EXIT_CODE,
    "exit_by_signal": EXIT_BY_SIGNAL,
    "exit_signal": EXIT_SIGNAL,
    "duration_s": JOB_DURATION,
    "reason": REASON,
    "hold_reason": HOLD_REASON,
}


def decode_reply(raw_headers: Mapping[str, Any], body: bytes) -> JobUpdate:
    """Decode a reply message into a JobUpdate; raise InvalidMessageError when it is not one."""
    headers, _ = normalize(raw_headers)
    try:
        state = JobState(str(headers.get(JOB_STATE)))
        job_id = str(headers[JOB_ID])
    except (ValueError, KeyError):
        raise InvalidMessageError("is missing or unknown", field=JOB_STATE) from None
    duration = headers.get(JOB_DURATION)
    return JobUpdate(
        job_id=job_id,
        state=state,
        host=headers.get(REMOTE_HOST),
        started_at=headers.get(STARTED_AT),
        exit_code=headers.get(EXIT_CODE),
        exit_by_signal=bool(headers.get(EXIT_BY_SIGNAL, False)),
        exit_signal=headers.get(EXIT_SIGNAL),
        duration_s=float(duration) if duration is not None else None,
        reason=headers.get(REASON) or headers.get(HOLD_REASON),
        attempt=int(headers.get(ATTEMPT, 1)),
        archive=body,
        headers=headers,
    )
