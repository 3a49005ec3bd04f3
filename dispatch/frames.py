"""Content headers py-amqp cannot decode, made readable instead of fatal.

py-amqp decodes a message's properties as its content-header frame arrives, and some
bytes a foreign producer may send (and RabbitMQ passes on unchecked) make that raise:
a short or long string that is not UTF-8, a timestamp past the year 9999, an unknown
field type. Raised there, the error leaves the connection's frame reader broken, so the
consumer loses its connection, the message is redelivered, and the same thing happens
again: a poison message.

:func:`tolerant` wraps py-amqp's frame reader. Frames that decode are untouched (no
cost on the hot path). A content header that does not decode is rewritten before
py-amqp reads it again: every property that decodes is kept, and the headers become

- :data:`UNDECODABLE`: what could not be decoded (for the Rejected reply's reason);
- :data:`RAW_PROPERTIES`: the original property bytes, byte for byte, so the
  dead-letter copy loses nothing.

Pure apart from py-amqp's (de)serialisers: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from amqp import method_framing, serialization
from amqp.basic_message import Message

__all__ = ["RAW_PROPERTIES", "UNDECODABLE", "readable_header", "tolerant"]

#: Header naming what of a message's properties could not be decoded.
UNDECODABLE = "x-dispatch-undecodable"
#: Header holding a message's original property bytes when they could not be decoded.
RAW_PROPERTIES = "x-dispatch-raw-properties"

_CONTENT_HEADER = 2
_HEAD = struct.Struct(">HHQH")  # class id, weight, body size, property flags
#: What a damaged header can raise while py-amqp decodes it.
DECODE_ERRORS = (UnicodeDecodeError, ValueError, OverflowError, OSError, struct.error,
                 IndexError, KeyError, serialization.FrameSyntaxError)

Frame = tuple[int, int, Any]


def tolerant(connection: Any, callback: Callable[..., Any]) -> Callable[[Frame], Any]:
    """Return py-amqp's frame reader, made to survive a content header it cannot decode."""
    stock = method_framing.frame_handler(connection, callback)

    def on_frame(frame: Frame) -> Any:
        try:
            return stock(frame)
        except DECODE_ERRORS:
            if frame[0] != _CONTENT_HEADER or _decodes(frame[2]):
                raise
        # py-amqp still waits for this message's header: hand it the readable one.
        return stock((frame[0], frame[1], readable_header(bytes(frame[2]))))

    return on_frame


def _decodes(buf: Any) -> bool:
    try:
        Message().inbound_header(buf)
    except DECODE_ERRORS:
        return False
    return True


def readable_header(buf: bytes) -> bytes:
    """Return a content header like ``buf`` whose properties py-amqp can decode.

    Properties that decode are kept; the headers table is replaced by
    :data:`UNDECODABLE` and :data:`RAW_PROPERTIES`.
    """
    try:
        class_id, weight, body_size, flags = _HEAD.unpack_from(buf, 0)
    except struct.error:
        class_id, weight, body_size, flags = Message.CLASS_ID, 0, 0, 0
    raw = bytes(buf[_HEAD.size - 2:])
    props, problems = _salvage(buf, flags)
    problems = problems or ["properties: cannot be decoded"]
    props["application_headers"] = {UNDECODABLE: "; ".join(problems), RAW_PROPERTIES: raw}
    encoded: bytes = Message(**props)._serialize_properties()
    return struct.pack(">HHQ", class_id, weight, body_size) + encoded


def _salvage(buf: bytes, flags: int) -> tuple[dict[str, Any], list[str]]:
    """Decode each property on its own; return those that decode and what did not."""
    props: dict[str, Any] = {}
    problems: list[str] = []
    offset = _HEAD.size
    try:
        for bit, (name, kind) in zip(range(15, 1, -1), Message.PROPERTIES, strict=False):
            if not flags & (1 << bit):
                continue
            if kind == "s":
                (size,) = struct.unpack_from(">B", buf, offset)
                data = buf[offset + 1:offset + 1 + size]
                offset += 1 + size
                try:
                    props[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    problems.append(f"{name}: is not UTF-8")
            elif kind == "F":
                (size,) = struct.unpack_from(">I", buf, offset)
                try:
                    serialization.loads("F", buf, offset)
                except DECODE_ERRORS as exc:
                    problems.append(f"headers: {_describe(exc)}")
                offset += 4 + size
            elif kind == "o":
                (props[name],) = struct.unpack_from(">B", buf, offset)
                offset += 1
            else:  # "L": the timestamp property, a plain integer
                (props[name],) = struct.unpack_from(">Q", buf, offset)
                offset += 8
    except struct.error:
        problems.append("properties: truncated")
    return props, problems


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "a string value is not UTF-8"
    # datetime.fromtimestamp is what raises these in a table (OSError: EOVERFLOW).
    if isinstance(exc, OverflowError | OSError) or (
            isinstance(exc, ValueError) and "year" in str(exc).lower()):
        return "a timestamp is out of range"
    return f"cannot be decoded ({type(exc).__name__}: {exc})"[:200]
