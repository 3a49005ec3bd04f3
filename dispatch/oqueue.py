"""openstack-queue's JSON job files, read as Dispatch job files.

openstack-queue (a batch queue that made an OpenStack server group per job) took a
three-stage job as JSON read by Gson, which is lenient: its own example quotes with
``'``. :func:`lenient` reads that text without evaluating it, :func:`to_fields` maps
each field to ``jobfile.schema.json``:

==========================  ==========================================================
``groupName``               ``name``
``minNodes``/``maxNodes``   ``nodes.min``/``nodes.max``
``minNodeSize``             ``nodes.min_cpus``
``payloadFiles``            ``inputs`` (each node gets them in its working directory)
``bootstrapScript``         ``bootstrap``; ``executeScript``: ``execute``;
                            ``cleanupScript``: ``cleanup`` (empty: none)
``jobMaximumWalltime``      ``requirements.time_limit`` (milliseconds, rounded up to s)
``logPath``/``resultsPath`` ``log_path``/``results_path``: client-side, where ``wait``
                            copies the per-node logs and copy-back archives
==========================  ==========================================================

The scripts' fixed places become the multi-node runtime's variables: ``/tmp/hostfile``
is ``$DISPATCH_HOSTFILE``, ``/tmp/copyback`` is ``$DISPATCH_COPYBACK``, and
``/tmp/<name>`` of a payload file is ``$DISPATCH_WORKDIR/<name>``. Any other field is an
error naming it.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from dispatch.errors import InvalidJobFileError

#: Keys only openstack-queue's format has: one of them makes a file one.
MARKERS = frozenset({"groupName", "minNodes", "maxNodes", "minNodeSize", "logPath",
                     "resultsPath", "payloadFiles", "bootstrapScript", "executeScript",
                     "cleanupScript", "jobMaximumWalltime"})
#: Fields of openstack-queue that have no meaning here, and why.
_CANNOT = {
    "osImageId": "nodes are the pool's execute nodes (or the cloud plane's image): remove it",
    "defaultLoginUser": "jobs run as the node's job account, not a VM login: remove it",
    "securityGroups": "nodes are not made per job here: remove it",
    "preferredAvailabilityZones": "choose nodes with a pool or requirements.group instead",
}
#: openstack-queue's fixed directory on its nodes (a name in scripts; never opened here).
OQ_TMP = "/tmp"  # noqa: S108
_PLACES = {"hostfile": "$DISPATCH_HOSTFILE", "copyback": "$DISPATCH_COPYBACK"}
_SCRIPTS = {"bootstrapScript": "bootstrap", "executeScript": "execute",
            "cleanupScript": "cleanup"}
_COUNTS = {"minNodes": "min", "maxNodes": "max", "minNodeSize": "min_cpus"}
#: Longest lenient (single-quoted) file read; job files are small.
MAX_LENIENT_CHARS = 1024 * 1024
_JSON_WORDS = {"true": True, "false": False, "null": None}


def is_oqueue(data: Mapping[str, Any]) -> bool:
    """Tell an openstack-queue job from a Dispatch job file by its keys."""
    return not MARKERS.isdisjoint(data)


def lenient(text: str) -> Any:
    """Return the value of JSON written with ``'`` quotes (Gson-lenient); None if it is not.

    The text is parsed, never evaluated: only dicts, lists, strings, numbers and
    ``true``/``false``/``null`` are accepted.
    """
    if len(text) > MAX_LENIENT_CHARS:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return _literal(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ValueError("** in a mapping")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)
                if k is not None}
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_WORDS:
        return _JSON_WORDS[node.id]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)):
        return -node.operand.value
    raise ValueError(f"{type(node).__name__} is not JSON")


def to_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the job-file fields an openstack-queue job describes; raise InvalidJobFileError."""
    for name in data:
        if name in _CANNOT:
            raise InvalidJobFileError(_CANNOT[name], field=name)
        if name not in MARKERS:
            raise InvalidJobFileError("is not a field of openstack-queue's job format",
                                      field=name)
    if not _text(data, "executeScript"):
        raise InvalidJobFileError("is required: the script the job runs", field="executeScript")
    payload = _payload(data.get("payloadFiles"))
    fields: dict[str, Any] = {}
    if _text(data, "groupName"):
        fields["name"] = _text(data, "groupName")
    # Always a multi-node job (of one node at least): the scripts expect its hostfile.
    fields["nodes"] = {"min": 1} | {key: _count(data, name) for name, key in _COUNTS.items()
                                    if name in data}
    if payload:
        fields["inputs"] = payload
    names = [PurePosixPath(p).name for p in payload]
    for name, key in _SCRIPTS.items():
        script = _text(data, name)
        if script:
            fields[key] = rewrite(script, names)
    if "jobMaximumWalltime" in data:
        fields["requirements"] = {"time_limit": _walltime_s(data["jobMaximumWalltime"])}
    for name, key in (("logPath", "log_path"), ("resultsPath", "results_path")):
        if _text(data, name):
            fields[key] = _text(data, name)
    return fields


def rewrite(script: str, payload_names: list[str]) -> str:
    """Replace openstack-queue's fixed places in ``script`` by the runtime's variables."""
    places = {**{name: f"$DISPATCH_WORKDIR/{name}" for name in payload_names}, **_PLACES}
    names = "|".join(re.escape(n) for n in sorted(places, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-]){re.escape(OQ_TMP)}/({names})(?![\w.-])")
    return pattern.sub(lambda match: places[match.group(1)], script)


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidJobFileError("must be a string", field=name)
    return value


def _count(data: Mapping[str, Any], name: str) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobFileError(f"{value!r} is not a whole number >= 1", field=name)
    return value


def _payload(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise InvalidJobFileError("must be a list of file paths", field="payloadFiles")
    names = [PurePosixPath(p).name for p in value]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidJobFileError(f"two files are named {twice[0]!r}: each node gets them in "
                                  "one directory", field="payloadFiles")
    return list(value)


def _walltime_s(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobFileError(f"{value!r} is not a number of milliseconds >= 1",
                                  field="jobMaximumWalltime")
    return math.ceil(value / 1000)
