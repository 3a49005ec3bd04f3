"""The job-submission thesis's user-input YAML, read as a Dispatch job file.

That format (``username``, ``user_mail``, ``destination_cluster``, ``requirements``,
``job``, ``compilation``, ``execution``, ``output``, ``resources``, ``kwargs``) described a
job for a Slurm cluster reached over SSH. :func:`to_fields` turns it into the fields of
``jobfile.schema.json``; a field that cannot be honoured here is an error naming it.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dispatch.errors import InvalidJobFileError
from dispatch.quantity import parse_duration_s, parse_size_mib

#: Keys only the user-input format has: one of them makes a file one.
MARKERS = frozenset({"job", "username", "user_mail", "destination_cluster", "kwargs",
                     "resources", "compilation", "private_key", "passphrase"})
KNOWN = MARKERS | {"requirements", "execution", "output"}
_CANNOT = {
    "private_key": "Dispatch sends jobs through the broker, not over SSH: remove it",
    "passphrase": "Dispatch sends jobs through the broker, not over SSH: remove it",
}
_RESOURCES = ("duration", "memory_per_thread", "nbr_processes", "nbr_threads_per_process",
              "nbr_jobs_in_array", "distribution", "nbr_of_nodes")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SRUN = re.compile(r"^\s*srun\s+")


def is_user_input(data: Mapping[str, Any]) -> bool:
    """Tell a user-input file from a Dispatch job file by its keys."""
    return "command" not in data and not MARKERS.isdisjoint(data)


def to_fields(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """Return the job-file fields a user-input mapping describes; raise InvalidJobFileError."""
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise InvalidJobFileError("is not a field of the user-input format", field=unknown[0])
    for name, why in _CANNOT.items():
        if name in data:
            raise InvalidJobFileError(why, field=name)
    if "execution" not in data:
        raise InvalidJobFileError("is required: the commands the job runs", field="execution")
    if "username" in data:
        _check_username(str(data["username"]))
    fields: dict[str, Any] = {"execution": [_unslurm(line) for line in _lines(data, "execution")]}
    fields.update(_placement(data))
    setup = _lines(data, "requirements") + _lines(data, "compilation")
    if setup:
        fields["setup"] = setup
    if data.get("output"):
        fields["output"] = _lines(data, "output")
    if data.get("job"):
        fields.update(_job(str(data["job"]), base_dir))
    if data.get("kwargs"):
        fields["environment"] = _environment(data["kwargs"])
    fields.update(_resources(data.get("resources") or {}))
    return fields


def _placement(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the pool (``destination_cluster``) and notice (``user_mail``) fields."""
    fields: dict[str, Any] = {}
    if data.get("user_mail"):
        fields["notify"] = {"email": str(data["user_mail"]), "when": "complete"}
    if data.get("destination_cluster"):
        pool = str(data["destination_cluster"])
        if not _POOL.match(pool):
            raise InvalidJobFileError(f"{pool!r} is not a pool name", field="destination_cluster")
        fields["pool"] = pool
    return fields


def _lines(data: Mapping[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str | int | float) and str(item).strip() for item in items):
        raise InvalidJobFileError("must be a command or a list of them", field=name)
    return [str(item) for item in items]


def _unslurm(line: str) -> str:
    """Drop a bare ``srun`` (one task on this node); srun with options cannot be honoured."""
    if not _SRUN.match(line):
        return line
    rest = _SRUN.sub("", line, count=1)
    if rest.startswith("-"):
        raise InvalidJobFileError(f"{line!r}: srun options have no meaning here; give the "
                                  "command, and resources for cores and memory",
                                  field="execution")
    return rest


def _check_username(name: str) -> None:
    url_user = urlsplit(os.environ.get("DISPATCH_BROKER_URL", "")).username
    mine = {getpass.getuser(), url_user} - {None}
    if name not in mine:
        raise InvalidJobFileError(
            f"{name!r} is not you ({' or '.join(sorted(str(m) for m in mine))}): jobs are "
            "owned by your broker user; remove username or give yours", field="username")


def _job(job: str, base_dir: Path) -> dict[str, Any]:
    if "://" in job:
        return {"source": job}
    path = Path(job).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        return {"source": str(path)}
    if path.is_file():
        return {"inputs": [str(path)]}
    raise InvalidJobFileError(f"{job!r} is not a git URL, a directory or a file", field="job")


def _environment(kwargs: Any) -> dict[str, Any]:
    if not isinstance(kwargs, Mapping):
        raise InvalidJobFileError("must be a mapping of NAME: value", field="kwargs")
    env = {}
    for name, value in kwargs.items():
        if not _ENV_NAME.match(str(name)):
            raise InvalidJobFileError("is not an environment variable name",
                                      field=f"kwargs.{name}")
        if not isinstance(value, str | int | float | bool):
            raise InvalidJobFileError("must be a string or a number", field=f"kwargs.{name}")
        env[str(name)] = value
    return env


def _resources(res: Any) -> dict[str, Any]:
    if not isinstance(res, Mapping):
        raise InvalidJobFileError("must be a mapping", field="resources")
    unknown = sorted(set(res) - set(_RESOURCES))
    if unknown:
        raise InvalidJobFileError("is not a resource of the user-input format",
                                  field=f"resources.{unknown[0]}")
    nodes = res.get("nbr_of_nodes", 1)
    if nodes != 1 or res.get("distribution", "grouped") != "grouped":
        name = "nbr_of_nodes" if nodes != 1 else "distribution"
        raise InvalidJobFileError("a job runs on one node: use grouped and 1 node",
                                  field=f"resources.{name}")
    cpus = _count(res, "nbr_processes") * _count(res, "nbr_threads_per_process")
    reqs: dict[str, Any] = {"cpus": cpus} if cpus > 1 else {}
    if "duration" in res:
        try:
            reqs["time_limit"] = parse_duration_s(res["duration"])
        except ValueError as exc:
            raise InvalidJobFileError(str(exc), field="resources.duration") from None
    if "memory_per_thread" in res:
        try:
            reqs["memory"] = parse_size_mib(res["memory_per_thread"]) * cpus
        except ValueError as exc:
            raise InvalidJobFileError(str(exc), field="resources.memory_per_thread") from None
    fields: dict[str, Any] = {"requirements": reqs} if reqs else {}
    if res.get("nbr_jobs_in_array", 1) != 1:
        fields["array"] = _count(res, "nbr_jobs_in_array")
    return fields


def _count(res: Mapping[str, Any], name: str) -> int:
    value = res.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobFileError(f"{value!r} is not a whole number >= 1",
                                  field=f"resources.{name}")
    return value
