"""The buffered AMQP transport: frames cut from one read, nothing lost to a timeout.

The transport reads a real socket (one end of a socket pair); the other end plays the
broker, writing frames whole, in pieces, or several at once.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import amqp
import kombu
import pytest
from amqp.exceptions import UnexpectedFrame

from dispatch import broker, frames, transport
from dispatch.transport import BufferedTCPTransport


def frame(kind: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([end])


@pytest.fixture
def pair() -> Iterator[tuple[BufferedTCPTransport, socket.socket]]:
    ours, theirs = socket.socketpair()
    t = BufferedTCPTransport("127.0.0.1:5672")
    t.sock = ours
    t._setup_transport()
    t.connected = True
    yield t, theirs
    ours.close()
    theirs.close()


def test_frames_that_arrive_together_are_read_with_one_recv(pair) -> None:
    t, broker_end = pair
    broker_end.sendall(frame(1, 1, b"method") + frame(2, 1, b"header") + frame(3, 1, b"body"))
    assert t.read_frame() == (1, 1, b"method")
    broker_end.close()  # whatever is still to come was read with the first frame
    assert t.read_frame() == (2, 1, b"header")
    assert t.read_frame() == (3, 1, b"body")


def test_a_partial_frame_waits_through_a_timeout_and_is_read_whole_later(pair) -> None:
    t, broker_end = pair
    whole = frame(1, 7, b"x" * 1000)
    broker_end.sendall(whole[:5])
    with t.having_timeout(0), pytest.raises(socket.timeout):
        t.read_frame()
    broker_end.sendall(whole[5:600])
    with t.having_timeout(0.05), pytest.raises(socket.timeout):
        t.read_frame()
    broker_end.sendall(whole[600:])
    with t.having_timeout(0):
        assert t.read_frame() == (1, 7, b"x" * 1000)


def test_a_poll_never_switches_the_socket_to_non_blocking(pair) -> None:
    t, _ = pair
    t.sock.settimeout(None)
    with t.having_timeout(0), pytest.raises(socket.timeout):
        t.read_frame()
    assert t.sock.gettimeout() is None  # MSG_DONTWAIT did the polling
    assert t.connected


def test_a_buffered_frame_is_read_without_touching_the_socket(pair) -> None:
    t, broker_end = pair
    t.sock.settimeout(None)
    broker_end.sendall(frame(1, 1, b"one") + frame(1, 1, b"two"))
    with t.having_timeout(5.0):
        assert t.read_frame() == (1, 1, b"one")
    with t.having_timeout(5.0) as sock:
        assert sock.gettimeout() is None  # "two" is buffered: no timeout to set
        assert t.read_frame() == (1, 1, b"two")
    with t.having_timeout(0.05), pytest.raises(socket.timeout):
        t.read_frame()  # nothing buffered: the timeout applies
    assert t.sock.gettimeout() is None


def test_a_frame_larger_than_one_read_is_assembled(pair) -> None:
    t, broker_end = pair
    payload = bytes(range(256)) * 1024  # 256 KiB, four reads' worth
    writer = threading.Thread(target=broker_end.sendall, args=(frame(3, 1, payload),))
    writer.start()
    assert t.read_frame() == (3, 1, payload)
    writer.join()


def test_a_closed_connection_and_a_bad_frame_end_are_errors(pair) -> None:
    t, broker_end = pair
    broker_end.sendall(frame(1, 1, b"ok", end=0x00))
    with pytest.raises(UnexpectedFrame):
        t.read_frame()
    broker_end.close()
    t2 = BufferedTCPTransport("127.0.0.1:5672")
    t2.sock, t2.connected = t.sock, True
    t2._setup_transport()
    with pytest.raises(OSError, match="closed"):
        t2.read_frame()
    assert not t2.connected


def test_plain_urls_get_the_buffered_transport_and_tls_keeps_py_amqps() -> None:
    assert transport.for_url("amqp://u:p@host:5672//") is transport.KombuTransport
    assert transport.for_url("amqp://a//;amqp://b//") is transport.KombuTransport
    assert transport.for_url("amqps://u:p@host:5671//") is transport.KombuSSLTransport
    assert transport.for_url("redis://host") is None


def test_a_tls_url_keeps_tls_and_reads_foreign_messages_as_plain_ones_do() -> None:
    url = "amqps://u:p@host:5671//"
    conn = kombu.Connection(url, transport=transport.for_url(url))
    assert conn.transport.client.ssl is True  # TLS on, as kombu's amqps transport does
    assert conn.transport.Connection.Channel is transport.KombuTransport.Connection.Channel
    conn.release()


def test_a_real_connection_uses_it(broker_url: str) -> None:
    with broker.connect(broker_url) as conn:
        assert isinstance(conn.connection.transport, BufferedTCPTransport)
        channel = conn.channel()
        name = channel.queue_declare("", exclusive=True).queue
        for i in range(50):  # many frames in flight, read in few pieces
            channel.basic_publish(amqp.Message(str(i)), "", name)
        got = [channel.basic_get(name, no_ack=True).body for _ in range(50)]
        # Bodies arrive as the bytes sent: py-amqp's decoding by content_encoding is off.
        assert got == [str(i).encode() for i in range(50)]


def _header(props: bytes) -> bytes:
    return struct.pack(">HHQ", 60, 0, 0) + props


def test_a_content_header_py_amqp_cannot_decode_is_made_readable_and_keeps_its_bytes() -> None:
    table = (b"\x04when" + b"T" + struct.pack(">Q", 2**63 - 1)
             + b"\x03Cmd" + b"S" + struct.pack(">I", 4) + b"true")
    props = (struct.pack(">H", 0x2000 | 0x0400 | 0x0080) + struct.pack(">I", len(table)) + table
             + b"\x05corr1" + b"\x03\xff\xfe\x01")
    with pytest.raises((OverflowError, ValueError, OSError)):
        amqp.Message().inbound_header(_header(props))

    readable = amqp.Message()
    readable.inbound_header(frames.readable_header(_header(props)))
    got = readable.properties
    assert got["correlation_id"] == "corr1"  # what decodes is kept
    assert "message_id" not in got  # not UTF-8: left out, and said so
    hdrs = got["application_headers"]
    assert "message_id: is not UTF-8" in hdrs[frames.UNDECODABLE]
    assert "timestamp" in hdrs[frames.UNDECODABLE]
    assert hdrs[frames.RAW_PROPERTIES] == props  # byte for byte


def test_a_header_that_decodes_is_left_alone_by_the_tolerant_reader() -> None:
    seen: list[Any] = []

    class Conn:
        bytes_recv = 0

    reader = frames.tolerant(Conn(), lambda *args: seen.append(args))
    props = struct.pack(">H", 0x0400) + b"\x02ok"
    method = struct.pack(">HH", 60, 71) + b"\x00" * 20  # basic.get-ok: content follows
    reader((1, 1, method))
    reader((2, 1, _header(props)))
    (_channel, _method, _args, msg), = seen
    assert msg.properties == {"correlation_id": "ok"}
