"""Admission: turning one delivery into a runnable JobRequest, or a reason to reject it."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from dispatch import frames, headers, requirements
from dispatch.archive import ZIP_CONTENT_TYPE, is_zip
from dispatch.errors import InvalidMessageError, UnsatisfiableJobError
from dispatch.job import JobRequest
from workers.slots import Slots

_BODY_TYPES = (ZIP_CONTENT_TYPE, "application/octet-stream", "", None)
#: content_encoding values that mean "the body is the bytes as sent" (kombu sets
#: ``binary`` for a bytes body, and ``utf-8`` for a text one).
RAW_ENCODINGS = frozenset({"", "binary", "identity", "8bit", "7bit", "utf-8", "utf8"})


@lru_cache(maxsize=1024)
def _expression(text: str) -> requirements.Expression:
    return requirements.parse(text)


def admit(properties: Mapping[str, Any], raw_headers: Mapping[str, Any], body: bytes, *,
          env: headers.Envelope, slots: Slots, machine_attrs: Mapping[str, object]) -> JobRequest:
    """Decode, validate and match one job message against this node.

    Raises InvalidMessageError for a malformed message and UnsatisfiableJobError for a
    valid job this node can never run; both carry the reason for the Rejected reply.
    """
    request = decode(properties, raw_headers, body, env=env)
    reason = unmet(request, slots, machine_attrs)
    if reason:
        raise UnsatisfiableJobError(reason)
    return request


def decode(properties: Mapping[str, Any], raw_headers: Mapping[str, Any], body: bytes, *,
           env: headers.Envelope) -> JobRequest:
    """Decode and validate one job message; raise InvalidMessageError if it is malformed."""
    undecodable = raw_headers.get(frames.UNDECODABLE)
    if undecodable is not None:
        raise InvalidMessageError(f"cannot be decoded: {undecodable}", field="properties")
    request = headers.decode_request(properties, raw_headers, env)
    if body:
        encoding = properties.get("content_encoding")
        if encoding is not None and str(encoding).strip().lower() not in RAW_ENCODINGS:
            raise InvalidMessageError(
                f"{encoding!r} is not supported: send the zip as raw bytes "
                "(content_encoding binary, or none)", field="content_encoding")
        if properties.get("content_type") not in _BODY_TYPES:
            raise InvalidMessageError(
                f"{properties.get('content_type')!r} is not application/zip", field="content_type")
        if not is_zip(body):
            raise InvalidMessageError("is not a zip archive of input files", field="body")
    elif request.spec.stdin:
        raise InvalidMessageError(f"{request.spec.stdin!r} names an input but the body is empty",
                                  field="In")
    return request


def unmet(request: JobRequest, slots: Slots, machine_attrs: Mapping[str, object]) -> str | None:
    """Return why a machine with ``slots`` and ``machine_attrs`` can never run ``request``."""
    reason = slots.never_fits(request.spec.resources)
    if reason:
        return reason
    expr = _expression(request.spec.requirements)
    if not expr.evaluate(machine_attrs):
        terms = expr.failing_terms(machine_attrs) or [expr.text]
        return f"Requirements not met by {machine_attrs.get('Machine')}: {' && '.join(terms)}"
    return None
