"""Hostile job messages for the fuzz test: what any producer in any language might send.

Each :class:`Hostile` carries a sequence number twice: as the ``x-fz-seq`` header and as
the marker ``fz-mark-<seq>;`` inside a header value, so its dead-letter copy can be told
even when its headers could not be decoded (the marker is then inside the raw property
bytes the copy keeps). Replies are told by ``correlation_id`` ``fz-<seq>``.
"""

from __future__ import annotations

import datetime
import decimal
import io
import random
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

ENCODINGS = [None, "binary", "utf-8", "UTF8", "gzip", "deflate", "base64", "made-up-enc", "",
             "identity", "x-\u00e9nc"]
CONTENT_TYPES = [None, "application/zip", "application/octet-stream", "text/plain",
                 "application/json", "application/x-msgpack", "application/x-python-serialize",
                 "application/data", "", "multipart/mixed; boundary=x"]
#: Properties of a content header must fit one 128 KiB frame; stay a little under.
MAX_HEADER_BYTES = 120_000


@dataclass
class Hostile:
    """One message to publish: ``raw_properties`` (crafted bytes) replaces ``properties``."""

    seq: int
    kind: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[Any, Any] = field(default_factory=dict)
    raw_properties: bytes | None = None
    #: True when a reply address that reaches the test's reply queue was given.
    replies_to_us: bool = False
    #: Publish with pika rather than py-amqp.
    via_pika: bool = False

    @property
    def marker(self) -> str:
        """The text that finds this message in a raw property block."""
        return f"fz-mark-{self.seq};"


class Generator:
    """Makes hostile messages from one seeded random source (the seed reproduces a run)."""

    def __init__(self, seed: int, reply_queue: str) -> None:
        self.rnd = random.Random(seed)
        self.reply_queue = reply_queue

    def make(self, seq: int) -> Hostile:
        """Return message ``seq``: a random hostile kind, with random properties."""
        kind = self.rnd.choice(_KINDS)
        msg = Hostile(seq=seq, kind=kind, body=b"")
        getattr(self, f"_{kind}")(msg)
        if msg.raw_properties is None:
            self._properties(msg)
            msg.headers["x-fz-seq"] = seq
            msg.headers["x-fz-mark"] = msg.marker
        return msg

    # -- properties shared by every kind -------------------------------------------------

    def _properties(self, msg: Hostile) -> None:
        rnd = self.rnd
        props = msg.properties
        props.setdefault("correlation_id", f"fz-{msg.seq}")
        if rnd.random() < 0.9:
            props.setdefault("message_id", f"fz-{msg.seq}")
        if "reply_to" not in props:
            self._reply_to(msg)
        for name, choices, chance in (("content_encoding", ENCODINGS, 0.7),
                                      ("content_type", CONTENT_TYPES, 0.7),
                                      ("priority", list(range(256)), 0.2),
                                      ("delivery_mode", [1, 2], 0.1),
                                      ("timestamp", [0, 2**31, 2**40], 0.05)):
            if name not in props and rnd.random() < chance:
                value = rnd.choice(choices)
                if value is not None:
                    props[name] = value
        for name in ("type", "app_id"):
            if rnd.random() < 0.1:
                props[name] = _shortstr(rnd, 40)

    def _reply_to(self, msg: Hostile) -> None:
        if "Cmd" in msg.headers:
            # It may run: its Exited reply is how the test sees it (a job with no reply
            # address that runs leaves no trace for a test to count).
            msg.properties["reply_to"] = self.reply_queue
            msg.replies_to_us = True
            return
        ours = [self.reply_queue, f"/exchange/amq.direct/{self.reply_queue}"]
        others = [f"no-such-queue-{msg.seq}", f"/exchange/no-such-exchange-{msg.seq % 7}/key",
                  "amq.rabbitmq.reply-to", "/exchange/", _shortstr(self.rnd, 255)]
        pick = self.rnd.random()
        if pick < 0.65:
            msg.properties["reply_to"] = ours[0] if pick < 0.6 else ours[1]
            msg.replies_to_us = True
        elif pick < 0.85:
            msg.properties["reply_to"] = self.rnd.choice(others)
        # else: no reply address at all

    # -- kinds ---------------------------------------------------------------------------

    def _random_headers(self, msg: Hostile) -> None:
        """Random header names, types and sizes, nested tables; maybe a Cmd among them."""
        rnd = self.rnd
        budget = rnd.choice([200, 2000, 20_000, MAX_HEADER_BYTES // 2])
        for _ in range(rnd.randrange(1, 12)):
            msg.headers[_name(rnd)] = _value(rnd, depth=0, budget=budget // 4)
        if rnd.random() < 0.3:
            msg.headers["Cmd"] = _value(rnd, depth=1, budget=200)
        msg.via_pika = rnd.random() < 0.4
        msg.body = _body(rnd)

    def _bad_job_fields(self, msg: Hostile) -> None:
        """A Cmd and job attributes of every wrong type and range."""
        rnd = self.rnd
        msg.headers["Cmd"] = rnd.choice(["true", "/bin/true", "", " ", "\x00", 5, None, ["a"],
                                         {"x": 1}, b"\xff\xfe", "x" * 5000])
        for name in ("RequestCpus", "RequestMemory", "RequestDisk", "TimeLimit", "Arguments",
                     "Environment", "KillSig", "Out", "Err", "In", "Requirements",
                     "MaxAttempts", "Attempt", "JobId", "Priority", "ArraySize"):
            if rnd.random() < 0.3:
                msg.headers[name] = rnd.choice([
                    -1, 0, 2**62, -(2**62), 1.5, float("nan"), float("inf"), "abc", "",
                    "\u00b2", "9" * 5000, True, None, ["1"], {"a": "b"}, b"\x80",
                    decimal.Decimal("1.5"), "../../etc/passwd", "/abs", "a\x00b",
                    'OpSys == "', "((((((((((", "' unbalanced"])
        msg.via_pika = rnd.random() < 0.4
        msg.body = _body(rnd)

    def _encodings(self, msg: Hostile) -> None:
        """No Cmd (or a good one) with every content_encoding and content_type combination."""
        rnd = self.rnd
        if rnd.random() < 0.5:
            msg.headers["Arguments"] = "x"
        else:
            msg.headers["Cmd"] = "true"
        msg.properties["content_encoding"] = rnd.choice(ENCODINGS) or "binary"
        msg.properties["content_type"] = rnd.choice(CONTENT_TYPES) or "application/zip"
        msg.body = rnd.choice([b"", _zip({"a.txt": b"hello"}), b"\x1f\x8b\x08\x00junk",
                               "h\u00e9llo".encode("latin-1")])
        msg.via_pika = rnd.random() < 0.5

    def _hostile_zip(self, msg: Hostile) -> None:
        """A runnable job whose input archive is a bomb, a zip-slip, links or not a zip."""
        rnd = self.rnd
        msg.headers["Cmd"] = "true"
        msg.properties["content_type"] = "application/zip"
        msg.body = rnd.choice(_HOSTILE_ZIPS)()

    def _runnable(self, msg: Hostile) -> None:
        """A good job with odd extra headers: it runs and gets an Exited reply."""
        rnd = self.rnd
        msg.headers["Cmd"] = "true"
        for _ in range(rnd.randrange(4)):
            msg.headers["x-fz-" + _name(rnd)[:40]] = _value(rnd, depth=0, budget=500)
        msg.properties["message_id"] = f"fz-{msg.seq}"
        msg.properties["reply_to"] = self.reply_queue
        msg.replies_to_us = True
        msg.via_pika = rnd.random() < 0.3

    def _near_frame_limit(self, msg: Hostile) -> None:
        """Headers that fill the frame: the dead-letter copy cannot add its reason."""
        msg.headers["Arguments"] = "x" * (131_072 - 250 - self.rnd.randrange(150))
        msg.properties["message_id"] = f"fz-{msg.seq}"

    def _undecodable(self, msg: Hostile) -> None:
        """A content header py-amqp cannot decode: bytes crafted by hand."""
        rnd = self.rnd
        message_id = rnd.choice([b"\xff\xfe" + str(msg.seq).encode(),
                                 f"fz-{msg.seq}".encode()])
        table: list[bytes] = [_field("x-fz-mark", b"S", _long(msg.marker.encode()))]
        trouble = "timestamp" if b"\xff" not in message_id else rnd.choice(
            ["timestamp", "shortstr", "both"])
        if trouble in ("timestamp", "both"):
            table.append(_field("when", b"T", struct.pack(">Q", 2**63 - 1)))
        if trouble == "shortstr":
            table.append(_field("note", b"S", _long(b"fine")))
        if rnd.random() < 0.5:
            table.append(_field("Cmd", b"S", _long(b"true")))
        reply_to = self.reply_queue.encode() if rnd.random() < 0.6 else None
        msg.raw_properties = _raw_properties(
            content_type=b"application/zip", headers=b"".join(table),
            correlation_id=f"fz-{msg.seq}".encode(), reply_to=reply_to, message_id=message_id)
        msg.replies_to_us = reply_to is not None
        msg.body = rnd.choice([b"", _zip({"a": b"1"})])


_KINDS = ["random_headers"] * 6 + ["bad_job_fields"] * 4 + ["encodings"] * 4 + \
    ["hostile_zip"] * 3 + ["runnable"] * 3 + ["undecodable"] * 2 + ["near_frame_limit"]


def _name(rnd: random.Random) -> str:
    pick = rnd.random()
    if pick < 0.3:
        return rnd.choice(["Cmd", "cmd", "CMD", "JobId", "Attempt", "compression",
                           "x-death", "x-match", "Reason", "JobState", "x-delivery-count"])
    if pick < 0.5:
        return _text(rnd, rnd.randrange(1, 60))
    size = rnd.randrange(1, 80)
    return _text(rnd, size).encode("utf-8")[:255].decode("utf-8", "ignore") or "k"


def _text(rnd: random.Random, size: int) -> str:
    alphabet = "abcXYZ019 _-./\"'\\\x00\x7f\u00e9\u4e2d\U0001f600\u202e"
    return "".join(rnd.choice(alphabet) for _ in range(size))


def _shortstr(rnd: random.Random, size: int) -> str:
    """Return random text of at most 255 UTF-8 bytes (an AMQP short string)."""
    return _text(rnd, size).encode("utf-8", "surrogatepass")[:255].decode("utf-8", "ignore")


def _value(rnd: random.Random, *, depth: int, budget: int) -> Any:
    """Return a random header value of any AMQP type, tables and arrays nested in it."""
    def table() -> dict[str, Any]:
        return {_name(rnd): _value(rnd, depth=depth + 1, budget=budget // 4)
                for _ in range(rnd.randrange(4))}

    def array() -> list[Any]:
        return [_value(rnd, depth=depth + 1, budget=budget // 4) for _ in range(rnd.randrange(4))]

    makers = [
        lambda: _text(rnd, rnd.randrange(min(budget, 4000) + 1)),
        lambda: "y" * rnd.randrange(budget + 1),
        lambda: bytes(rnd.randrange(256) for _ in range(rnd.randrange(64))),
        lambda: rnd.choice([0, 1, -1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63)]),
        lambda: rnd.choice([0.0, -1.5, 1e308, float("inf")]),
        lambda: rnd.choice([True, False, None, "", '"quoted"']),
        lambda: decimal.Decimal(rnd.choice(["1.5", "-0.001", "12345678.9"])),
        lambda: datetime.datetime(rnd.choice([1970, 2000, 2038, 9999]), 1, 1),
    ]
    if depth < 4:
        makers += [table, table, array]
    return rnd.choice(makers)()


def _body(rnd: random.Random) -> bytes:
    pick = rnd.randrange(5)
    if pick == 0:
        return b""
    if pick == 1:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 2000)))
    if pick == 2:
        return _zip({"in.txt": b"data"})
    if pick == 3:
        return rnd.choice(_HOSTILE_ZIPS)()
    return "not a zip \u00e9".encode()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    with (zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf,
          zf.open("zeros", "w", force_zip64=True) as out):
        block = bytes(1 << 20)
        for _ in range(200):  # 200 MiB of zeros in about 200 KiB
            out.write(block)
    return buf.getvalue()


def _slip() -> bytes:
    return _zip({"../../../../tmp/fz-escaped": b"x"})


def _absolute() -> bytes:
    return _zip({"/tmp/fz-absolute": b"x"})


def _symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
        zf.writestr("link/inside", b"through the link")
    return buf.getvalue()


def _truncated() -> bytes:
    return _zip({"a.txt": b"a" * 5000})[:-30]


def _many() -> bytes:
    return _zip({f"d{i}/f{i}": b"" for i in range(300)})


_BOMB = _bomb()
_HOSTILE_ZIPS = [lambda: _BOMB, _slip, _absolute, _symlink, _truncated, _many]


def _long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _field(name: str, kind: bytes, value: bytes) -> bytes:
    key = name.encode()
    return struct.pack(">B", len(key)) + key + kind + value


def _short(data: bytes) -> bytes:
    return struct.pack(">B", len(data)) + data


def _raw_properties(*, content_type: bytes, headers: bytes, correlation_id: bytes,
                    reply_to: bytes | None, message_id: bytes) -> bytes:
    """Return a basic-class property block, flags and list, built by hand."""
    flags = 0x8000 | 0x2000 | 0x0400 | 0x0080 | 0x1000
    parts = [_short(content_type), _long(headers), b"\x02", _short(correlation_id)]
    if reply_to is not None:
        flags |= 0x0200
        parts.append(_short(reply_to))
    parts.append(_short(message_id))
    return struct.pack(">H", flags) + b"".join(parts)
