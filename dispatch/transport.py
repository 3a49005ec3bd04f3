"""A py-amqp TCP transport that reads the socket in large pieces.

py-amqp's own TCP transport reads each frame with three ``recv`` calls (the 7-byte
header, the payload, the end octet), so a job message costs half a dozen system
calls to take in and a confirm two or three more. This one asks the socket for
whatever is there (up to :data:`READ_SIZE` bytes) and cuts frames from its own
buffer: one ``recv`` for everything that has arrived.

A zero timeout (a poll: "whatever has arrived") is a ``MSG_DONTWAIT`` read rather
than two ``ioctl`` calls switching the socket to non-blocking and back, and no timeout
is applied at all while a whole frame waits in the buffer. (The one consequence: a
``basic_publish(timeout=...)`` made while a frame is buffered writes without that
timeout; Dispatch never passes one.)

Nothing is lost to a timeout: a frame is taken from the buffer only once it is
whole, so a partial frame simply waits in the buffer for the rest. A caller that
waits on the socket with a selector must drain frames until a read times out before
it selects again (the execute node does): the buffer then holds no whole frame.

Writes can be held, too (:meth:`BufferedTCPTransport.hold_writes`, used by the execute
node): frames written while held are gathered and go out in one ``sendall`` at
:meth:`~BufferedTCPTransport.flush_writes`, or before the socket is read, so a
request is always sent before its answer is awaited. On loopback each ``sendall``
also runs the broker's side of the delivery in the sender's system call: a job's
replies, claim and events written in one go cost one of those instead of five or six.

TLS connections (``amqps://``) keep py-amqp's own TLS socket.

Every connection made here also reads what foreign producers send without breaking:
bodies stay the bytes that arrived (py-amqp would otherwise decode a body by its
``content_encoding``, turning a zip into text or failing on ``binary``), and a content
header py-amqp cannot decode is made readable (:mod:`dispatch.frames`) instead of
breaking the connection's frame reader.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import amqp.transport
from amqp.exceptions import UnexpectedFrame
from kombu.transport import pyamqp

from dispatch import frames

__all__ = ["BufferedTCPTransport", "KombuSSLTransport", "KombuTransport", "for_url"]

#: Bytes asked of the socket at once (a frame larger than this is read whole).
READ_SIZE = 65536
#: Held writes go out once they reach this many bytes, whatever the holder does.
WRITE_HOLD_MAX = 262144
_FRAME_END = 0xCE
_HEADER = struct.Struct(">BHI")
#: Socket errors after which the connection is still usable (py-amqp's list).
_UNAVAILABLE = amqp.transport._UNAVAIL


class BufferedTCPTransport(amqp.transport.TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport with frames cut from a read buffer."""

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._rbuf = bytearray()
        self._rpos = 0
        self._recv_flags = 0
        self._wbuf = bytearray()
        self._holding = False

    def hold_writes(self) -> None:
        """Gather writes from now on until :meth:`flush_writes` (or a read) sends them."""
        self._holding = True

    def write(self, s: bytes) -> None:
        """Send ``s``, or add it to the held writes."""
        if not self._holding:
            super().write(s)
            return
        self._wbuf += s
        if len(self._wbuf) >= WRITE_HOLD_MAX:
            self.flush_writes()

    def flush_writes(self) -> None:
        """Send the held writes in one ``sendall``."""
        if self._wbuf:
            data = bytes(self._wbuf)
            self._wbuf.clear()
            super().write(data)

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[socket.socket]:
        """Apply ``timeout`` to reads in the block; zero means take only what is there.

        With a whole frame already buffered the next read needs no socket, so the
        socket's mode is left alone (py-amqp switches it there and back each frame).
        """
        if timeout is None or self._whole_frame_buffered():
            yield self.sock
            return
        if timeout != 0:
            with super().having_timeout(timeout) as sock:
                yield sock
            return
        self._recv_flags = socket.MSG_DONTWAIT
        try:
            yield self.sock
        finally:
            self._recv_flags = 0

    def _whole_frame_buffered(self) -> bool:
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos < 7:
            return False
        size: int = _HEADER.unpack_from(buf, pos)[2]
        return len(buf) > pos + 7 + size

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        """Return the next ``(frame type, channel, payload)``, reading the socket if need be.

        Raises ``socket.timeout`` when the socket's timeout passes (or, non-blocking,
        nothing is there) before a whole frame has arrived.
        """
        while True:
            buf, pos = self._rbuf, self._rpos
            if len(buf) - pos >= 7:
                frame_type, channel, size = _HEADER.unpack_from(buf, pos)
                end = pos + 7 + size
                if len(buf) > end:
                    if buf[end] != _FRAME_END:
                        raise UnexpectedFrame(
                            f"Received frame_end {buf[end]:#04x} while expecting 0xce")
                    payload = bytes(buf[pos + 7:end])
                    self._rpos = end + 1
                    return frame_type, channel, payload
                self._fill(end + 1 - pos)
            else:
                self._fill(7)

    def _fill(self, frame_bytes: int) -> None:
        """Read what the socket has (at least one byte) after compacting the buffer."""
        if self._wbuf:  # what was written goes before any wait for an answer
            self.flush_writes()
        if self._rpos:
            del self._rbuf[:self._rpos]
            self._rpos = 0
        try:
            data = self.sock.recv(max(READ_SIZE, frame_bytes - len(self._rbuf)),
                                  self._recv_flags)
        except BlockingIOError:
            raise TimeoutError() from None  # non-blocking and nothing there yet
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno not in _UNAVAILABLE:
                self.connected = False
            raise
        if not data:
            self.connected = False
            raise OSError("Server unexpectedly closed connection")
        self._rbuf += data


class _Channel(pyamqp.Channel):  # type: ignore[misc]
    """kombu's channel, handing message bodies over as the bytes that arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auto_decode = False


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    Channel = _Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("frame_handler", frames.tolerant)
        super().__init__(*args, **kwargs)

    def Transport(self, host: str, connect_timeout: float | None,
                  ssl: Any = False, read_timeout: float | None = None,
                  write_timeout: float | None = None, **kwargs: Any) -> Any:
        if ssl:
            return super().Transport(host, connect_timeout, ssl, read_timeout, write_timeout,
                                     **kwargs)
        return BufferedTCPTransport(host, connect_timeout=connect_timeout,
                                    read_timeout=read_timeout, write_timeout=write_timeout,
                                    **kwargs)


class KombuTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport, with :class:`BufferedTCPTransport` for plain TCP."""

    Connection = _Connection


class KombuSSLTransport(KombuTransport):
    """The same over TLS (``amqps://``): py-amqp's TLS socket, Dispatch's channels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.client.ssl:  # as kombu's own amqps transport: TLS with default settings
            self.client.ssl = True


def for_url(url: str) -> type[KombuTransport] | None:
    """Return the transport for an ``amqp://`` or ``amqps://`` URL; None (kombu's choice)."""
    scheme = urlsplit(url.split(";", 1)[0].strip()).scheme
    if scheme == "amqps":
        return KombuSSLTransport
    return KombuTransport if scheme in ("amqp", "pyamqp") else None
