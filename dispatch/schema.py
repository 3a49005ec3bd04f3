"""Validation against the language-neutral JSON Schemas in ``schemas/``.

The only module that imports the JSON Schema libraries. Each schema is compiled
once into Python code by fastjsonschema, which decides (about 10 µs a job message);
only a message it refuses is run through jsonschema to name the field at fault, so
jsonschema is imported then and only then (it would add ~60 ms and ~10 MiB to every
``dispatch`` command and worker; a smaller worker also forks faster).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastjsonschema

from dispatch.errors import InvalidJobError

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

JOB_REQUEST = "job-request"
JOB_REPLY = "job-reply"
JOBFILE = "jobfile"
EVENT = "event"
CONTROL = "control"


def schemas_dir() -> Path:
    """Return the folder holding the ``*.schema.json`` files."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "job-request.schema.json").is_file():
            return candidate
    raise FileNotFoundError(f"schemas/ not found beside {here}")


@cache
def load(name: str) -> dict[str, Any]:
    """Return the parsed schema ``schemas/<name>.schema.json``."""
    text = (schemas_dir() / f"{name}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(name: str) -> Validator:
    import jsonschema.validators  # noqa: PLC0415 - only to explain a refusal (see above)

    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: Validator = cls(schema)
    return validator


@cache
def _fast(name: str) -> Any:
    return fastjsonschema.compile(load(name))


def validate(name: str, instance: object, error: type[InvalidJobError]) -> None:
    """Check ``instance`` against schema ``name``; raise ``error`` naming the field at fault."""
    try:
        _fast(name)(instance)
        return
    except fastjsonschema.JsonSchemaException as exc:
        fast_reason = str(exc)
    from jsonschema.exceptions import best_match  # noqa: PLC0415 - see _validator

    found = best_match(_validator(name).iter_errors(instance))
    if found is None:  # the two validators disagree: trust the refusal, say what it said
        raise error(fast_reason)
    raise error(describe(found), field=field_path(found))


def field_path(found: ValidationError) -> str | None:
    """Return the dotted path of the offending field, skipping the message envelope."""
    path = [str(part) for part in found.absolute_path]
    if found.validator == "required" and isinstance(found.message, str):
        missing = found.message.split("'")[1] if "'" in found.message else None
        if missing:
            path.append(missing)
    if found.validator == "additionalProperties":
        extra = sorted(set(found.instance) - set(found.schema.get("properties", {})))
        if extra:
            path.append(extra[0])
    if path and path[0] in ("headers", "properties"):
        path = path[1:]
    return ".".join(path) or None


def describe(found: ValidationError) -> str:
    """Return a one-line human message for a validation error."""
    if found.validator == "required":
        return "is required"
    if found.validator == "additionalProperties":
        return "is not a known field"
    if found.validator in ("oneOf", "anyOf"):
        return f"has the wrong type or form: {_short(found.instance)}"
    if found.validator == "maxLength":
        return f"is longer than {found.validator_value} characters"
    if found.validator == "not":
        return f"is not allowed: {_short(found.instance)}"
    return str(found.message).replace("\n", " ")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
