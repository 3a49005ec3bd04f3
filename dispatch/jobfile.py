"""Job files (YAML or JSON) and ``-r`` requirement strings, turned into JobSpecs.

Errors name the field at fault, in one line, for the CLI to print.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dispatch import oqueue, schema, userinput
from dispatch.errors import InvalidJobFileError
from dispatch.headers import quote
from dispatch.job import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    JobSpec,
    Nodes,
    Notify,
    Resources,
    Stages,
    signal_number,
)
from dispatch.quantity import parse_duration_s, parse_size_mib
from dispatch.topology import DEFAULT_POOL

PRIORITY_WORDS = {"low": 1, "med": DEFAULT_PRIORITY, "high": 8}
#: Schemes a node fetches a ``source`` from; anything else with ``://`` is refused.
GIT_SCHEMES = ("https", "http", "git", "ssh", "file")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REQUIREMENT_KEYS = ("cpus", "memory", "disk", "time_limit", "group", "notgroup", "host",
                     "expression")


def load(path: Path) -> dict[str, Any]:
    """Read and validate a job file; raise InvalidJobFileError naming the field at fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidJobFileError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        data = oqueue.lenient(text) if path.suffix == ".json" else None  # Gson's ' quotes
        if not isinstance(data, dict) or not oqueue.is_oqueue(data):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidJobFileError(f"{path}: not valid {_kind(path)}: {first}") from None
    if not isinstance(data, dict):
        raise InvalidJobFileError(f"{path}: a job file must be a mapping of fields")
    fields: dict[str, Any] = data
    if userinput.is_user_input(fields):
        fields = userinput.to_fields(fields, path.parent)  # the thesis's format (user guide)
    elif oqueue.is_oqueue(fields):
        fields = oqueue.to_fields(fields)  # openstack-queue's format (user guide)
    if not {"command", "execution", "execute"} & fields.keys():  # the schema's anyOf, named
        raise InvalidJobFileError("is required (or execution: shell lines, or execute: a "
                                  "script)", field="command")
    schema.validate(schema.JOBFILE, fields, InvalidJobFileError)
    return fields


def _kind(path: Path) -> str:
    return "JSON" if path.suffix == ".json" else "YAML"


def parse_requirement_string(text: str) -> dict[str, Any]:
    """Parse wq's ``-r "cpus: 2; memory: 4G"`` into job-file requirement fields."""
    out: dict[str, Any] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        key = key.strip().replace("-", "_")
        if not sep or key not in _REQUIREMENT_KEYS:
            raise InvalidJobFileError(
                f"{part.strip()!r}: expected one of {', '.join(_REQUIREMENT_KEYS)} as KEY: VALUE",
                field="requirements")
        value = value.strip()
        whole = value.isascii() and value.isdecimal() and len(value) <= 9
        out[key] = int(value) if key == "cpus" and whole else value
    if "cpus" in out and not isinstance(out["cpus"], int):
        raise InvalidJobFileError(f"{out['cpus']!r} is not a whole number", "requirements.cpus")
    return out


def spec_from_fields(data: Mapping[str, Any], base_dir: Path = Path()) -> JobSpec:
    """Return the JobSpec a validated job file (or CLI options in that shape) describes."""
    command, arguments = _command(data)
    reqs = data.get("requirements") or {}
    resources, time_limit = _resources(reqs)
    nodes = _nodes(data)
    min_cpus = (data.get("nodes") or {}).get("min_cpus")
    if min_cpus is not None:
        if "cpus" in reqs and int(reqs["cpus"]) != int(min_cpus):
            raise InvalidJobFileError("give nodes.min_cpus or requirements.cpus, not both",
                                      field="nodes.min_cpus")
        resources = Resources(int(min_cpus), resources.memory_mb, resources.disk_mb)
    stages, shipped = _stages(data, base_dir)
    if nodes is not None:  # the node would reject them (dispatch/headers.py _nodes)
        for name in ("source", "ref", "setup", "output", "modules", "stdin"):
            if data.get(name):
                raise InvalidJobFileError("is not supported in a multi-node job (its stages "
                                          "are bootstrap, execute, cleanup)", field=name)
    return JobSpec(
        command=command,
        arguments=arguments,
        environment={str(k): _env_text(v) for k, v in (data.get("environment") or {}).items()},
        inputs=shipped + tuple(_input_path(base_dir, p) for p in data.get("inputs") or ()),
        stdin=data.get("stdin"),
        stdout=data.get("stdout", "job.out"),
        stderr=data.get("stderr", "job.err"),
        resources=resources,
        time_limit_s=time_limit,
        kill_signal=_signal(data.get("kill_signal", "SIGTERM")),
        requirements=requirements_expression(reqs),
        max_attempts=int(data.get("max_attempts", DEFAULT_MAX_ATTEMPTS)),
        priority=parse_priority(data.get("priority", DEFAULT_PRIORITY)),
        pool=data.get("pool") or DEFAULT_POOL,
        name=data.get("name"),
        notify=_notify(data.get("notify")),
        stages=stages,
        nodes=nodes,
        fallback=bool(data.get("fallback", True)),
    )


def _nodes(data: Mapping[str, Any]) -> Nodes | None:
    """Return the multi-node part of a job file (``nodes:``, bootstrap, cleanup), if any."""
    spec = data.get("nodes") or {}
    if not spec and not data.get("bootstrap") and not data.get("cleanup"):
        return None
    low = int(spec.get("min", 1))
    high = int(spec.get("max", low))
    if high < low:
        raise InvalidJobFileError(f"{high} is less than nodes.min ({low})", field="nodes.max")
    gather = Nodes.gather_s
    if "gather" in spec:
        try:
            gather = int(parse_duration_s(spec["gather"]))
        except ValueError as exc:
            raise InvalidJobFileError(str(exc), field="nodes.gather") from None
    return Nodes(min=low, max=high, bootstrap=data.get("bootstrap") or None,
                 cleanup=data.get("cleanup") or None, gather_s=gather)


def _stages(data: Mapping[str, Any], base_dir: Path) -> tuple[Stages | None, tuple[Path, ...]]:
    """Return the job's Stages (None when it has none) and the inputs a source directory ships."""
    source = data.get("source")
    shipped: tuple[Path, ...] = ()
    if source and not _URL.match(source):
        if data.get("ref"):
            raise InvalidJobFileError("only a git source has a ref", field="ref")
        folder = Path(source).expanduser()
        folder = folder if folder.is_absolute() else base_dir / folder
        if not folder.is_dir():
            raise InvalidJobFileError(f"{source!r} is neither a git URL nor a directory",
                                      field="source")
        shipped, source = tuple(sorted(folder.iterdir())), None
    elif source and source.split(":", 1)[0].lower() not in GIT_SCHEMES:
        raise InvalidJobFileError(f"{source!r}: a git URL is {', '.join(GIT_SCHEMES)}://...",
                                  field="source")
    if data.get("ref") and not source:
        raise InvalidJobFileError("a ref needs a git source", field="ref")
    modules = data.get("modules") or ()
    pre, post = (modules.get("pre") or (), modules.get("post") or ()) if isinstance(
        modules, Mapping) else (modules, modules)
    stages = Stages(source=source, ref=data.get("ref"), setup=_lines(data.get("setup")),
                    output=_lines(data.get("output")), pre_modules=tuple(pre),
                    post_modules=tuple(post))
    return (None if stages == Stages() else stages), shipped


def _lines(value: str | list[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _notify(value: Mapping[str, Any] | None) -> Notify | None:
    if not value or not (value.get("email") or value.get("url")):
        return None
    return Notify(value.get("email"), value.get("url"),
                  str(value.get("when", "complete")).capitalize())


def _command(data: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    if "execute" in data:
        if "command" in data or "execution" in data:
            raise InvalidJobFileError("give execute, command or execution, one of them",
                                      field="execute")
        return "/bin/sh", ("-c", data["execute"])
    if "execution" in data:
        if "command" in data:
            raise InvalidJobFileError("give command or execution, not both", field="execution")
        steps = _lines(data["execution"])
        return "/bin/sh", ("-c" if len(steps) == 1 else "-ec", "\n".join(steps))
    command = data["command"]
    extra = data.get("arguments") or ()
    if isinstance(extra, str):
        extra = shlex.split(extra)
    if isinstance(command, list):
        return str(command[0]), tuple(str(a) for a in [*command[1:], *extra])
    if extra or " " not in command.strip():
        return command, tuple(str(a) for a in extra)
    words = shlex.split(command)
    return words[0], tuple(words[1:])


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _input_path(base_dir: Path, text: str) -> Path:
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise InvalidJobFileError(f"{text!r} does not exist", field="inputs")
    return path


def _resources(reqs: Mapping[str, Any]) -> tuple[Resources, int | None]:
    def field(name: str, parse: Any) -> int:
        if name not in reqs:
            return 0
        try:
            return int(parse(reqs[name]))
        except ValueError as exc:
            raise InvalidJobFileError(str(exc), field=f"requirements.{name}") from None

    limit = field("time_limit", parse_duration_s)
    resources = Resources(cpus=int(reqs.get("cpus", 1)), memory_mb=field("memory", parse_size_mib),
                          disk_mb=field("disk", parse_size_mib))
    return resources, limit or None


def requirements_expression(reqs: Mapping[str, Any]) -> str:
    """Return the ClassAd expression for wq-style group/notgroup/host labels and ``expression``."""
    terms = [f"stringListMember({quote(g)}, Groups)" for g in _names(reqs.get("group"))]
    terms += [f"!stringListMember({quote(g)}, Groups)" for g in _names(reqs.get("notgroup"))]
    hosts = _names(reqs.get("host"))
    if hosts:
        terms.append("(" + " || ".join(f"Machine == {quote(h)}" for h in hosts) + ")")
    if reqs.get("expression"):
        terms.append(f"({reqs['expression']})")
    return " && ".join(terms) or "TRUE"


def _names(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _signal(value: Any) -> int:
    try:
        return signal_number(value)
    except ValueError as exc:
        raise InvalidJobFileError(str(exc), field="kill_signal") from None


def parse_priority(value: Any) -> int:
    """Return a 0-9 priority from ``low``/``med``/``high`` or a number."""
    if isinstance(value, str) and value.lower() in PRIORITY_WORDS:
        return PRIORITY_WORDS[value.lower()]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if not 0 <= number <= 9:
        raise InvalidJobFileError(f"{value!r} is not low, med, high or 0-9", field="priority")
    return number
