"""The kombu/py-amqp edge: connections, declarations, confirmed publishing.

Third-party broker exceptions are translated into :mod:`dispatch.errors` here.
Declarations happen once per connection, never per job.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import amqp
import amqp.exceptions
import kombu
import kombu.exceptions

from dispatch import config, topology, transport
from dispatch.errors import (
    BrokerError,
    BrokerUnreachableError,
    PublishNackedError,
)

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 30
PERSISTENT = 2

#: Errors that mean the connection or channel is gone and must be rebuilt.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    socket.error,
    OSError,
)


def connect(url: str, *, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
            connect_timeout_s: float = 10.0) -> kombu.Connection:
    """Open a connection with heartbeats on; raise BrokerUnreachableError when none can be made.

    ``url`` may list a cluster's nodes separated by ``;``: each is tried once, in turn,
    starting after the one this process last connected to (so a reconnect after a node
    is lost tries the others first, and a dead node is never the only one tried).
    """
    urls = cluster_urls(url)
    start = _next_start.get(url, 0) % len(urls)
    errors = []
    for i in (*range(start, len(urls)), *range(start)):
        one = urls[i]
        conn = kombu.Connection(one, heartbeat=heartbeat_s, connect_timeout=connect_timeout_s,
                                transport=transport.for_url(one))
        try:
            conn.ensure_connection(max_retries=0)  # one try a node: callers own their retries
        except CONNECTION_ERRORS as exc:
            conn.release()
            errors.append(f"{safe_url(one)}: {exc}")
            continue
        _next_start[url] = i + 1
        if i != start or len(urls) > 1:
            log.info("connected to broker node %s", safe_url(one))
        return conn
    raise BrokerUnreachableError(f"cannot reach broker at {'; '.join(errors)}")


#: Where the next ``connect`` to a ``;``-separated URL list starts (after the last used).
_next_start: dict[str, int] = {}


def cluster_urls(url: str) -> list[str]:
    """Return the URLs of a ``;``-separated list (one URL is a list of one)."""
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if not urls:
        raise BrokerUnreachableError("no broker URL given")
    return urls


def release_quietly(conn: kombu.Connection | None) -> None:
    """Release a connection that may already be broken; errors are only logged at debug."""
    if conn is None:
        return
    try:
        conn.release()
    except Exception:
        log.debug("error while releasing a broken connection", exc_info=True)


def safe_url(url: str) -> str:
    """Return ``url`` with any password masked, for logs and error messages."""
    if ";" in url:
        return ";".join(safe_url(u.strip()) for u in url.split(";") if u.strip())
    if "://" not in url:
        return "<broker url>"
    try:
        return str(kombu.Connection(url).as_uri(include_password=False))
    except Exception:
        return "<broker url>"


def queue_type_in_use(queue_type: str | None = None) -> str:
    """Return the type Dispatch's durable queues have: ``queue_type``, else the environment's.

    ``DISPATCH_QUEUE_TYPE`` (classic by default) must be the same for every client, node
    and ledger of one broker: a queue declared as one type is refused as the other.
    """
    return topology.check_queue_type(queue_type or config.queue_type())


def prefetch_is_global(queue_type: str | None = None) -> bool:
    """Tell whether a consumer's prefetch may be shared by its channel's consumers.

    Quorum queues refuse a global prefetch (the broker closes the connection at
    ``basic.consume``): there each consumer has its own, fixed when it starts consuming.
    """
    return queue_type_in_use(queue_type) == topology.CLASSIC


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Translate broker-library exceptions raised inside the block into BrokerError."""
    try:
        yield
    except amqp.exceptions.NotFound as exc:
        raise BrokerError(f"{action}: {exc.reply_text}") from exc
    except amqp.exceptions.AccessRefused as exc:
        raise BrokerError(f"{action}: access refused: {exc.reply_text}") from exc
    except amqp.exceptions.PreconditionFailed as exc:
        raise BrokerError(f"{action}: {exc.reply_text}") from exc
    except CONNECTION_ERRORS as exc:
        raise BrokerUnreachableError(f"{action}: connection lost: {exc}") from exc


def declare_pool(channel: amqp.Channel, pool: str, queue_type: str | None = None) -> str:
    """Declare a pool's exchanges, queues and bindings; return its (normal level's) queue."""
    return dict(declare_pool_queues(channel, pool, queue_type))[topology.NORMAL]


def declare_pool_queues(channel: amqp.Channel, pool: str,
                        queue_type: str | None = None) -> list[tuple[str, str]]:
    """Declare every queue of a pool, bound to its level's exchange with key ``pool``.

    Returns ``(level, queue)`` highest level first: one classic priority queue, or on
    quorum queues one queue for each priority level.
    """
    kind = queue_type_in_use(queue_type)
    declare_dead_letter(channel, kind)
    args = topology.pool_queue_arguments(kind)
    queues = topology.pool_queues(pool, kind)
    for level, queue in queues:
        exchange = topology.jobs_exchange(level)
        channel.exchange_declare(exchange, "direct", durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=args)
        channel.queue_bind(queue, exchange, routing_key=pool)
    return queues


def declare_jobs_exchanges(channel: amqp.Channel, queue_type: str | None = None) -> None:
    """Declare the exchange(s) jobs are published to: one, or one a priority level."""
    kind = queue_type_in_use(queue_type)
    levels = topology.PRIORITY_LEVELS if kind == topology.QUORUM else (topology.NORMAL,)
    for level in levels:
        channel.exchange_declare(topology.jobs_exchange(level), "direct", durable=True,
                                 auto_delete=False)


def declare_dead_letter(channel: amqp.Channel, queue_type: str | None = None) -> None:
    """Declare the dead-letter exchange and the queue that keeps what reaches it."""
    dlx = topology.dead_letter_exchange()
    channel.exchange_declare(dlx, "fanout", durable=True, auto_delete=False)
    channel.queue_declare(topology.dead_letter_queue(), durable=True, auto_delete=False,
                          arguments=topology.dead_letter_queue_arguments(
                              queue_type_in_use(queue_type)))
    channel.queue_bind(topology.dead_letter_queue(), dlx, routing_key="")


def declare_custom(channel: amqp.Channel, exchange: str, routing_key: str, queue: str) -> str:
    """Declare a queue bound to any exchange, as HTCondor's example topology wants.

    ``amq.*`` exchanges exist already and may only be declared passively.
    """
    if exchange.startswith("amq."):
        channel.exchange_declare(exchange, "direct", passive=True)
    elif exchange:
        channel.exchange_declare(exchange, "direct", durable=True, auto_delete=False)
    channel.queue_declare(queue, durable=True, auto_delete=False)
    if exchange:
        channel.queue_bind(queue, exchange, routing_key=routing_key)
    return queue


def declare_reply_queue(channel: amqp.Channel, client_id: str,
                        queue_type: str | None = None) -> str:
    """Declare a client's durable reply queue, which expires after days unused."""
    queue = topology.reply_queue(client_id)
    args = topology.reply_queue_arguments(queue_type=queue_type_in_use(queue_type))
    channel.queue_declare(queue, durable=True, auto_delete=False, exclusive=False,
                          arguments=args)
    return queue


def queue_exists(conn: kombu.Connection, queue: str) -> bool:
    """Tell whether ``queue`` exists, asking on a channel of its own.

    A passive declare of a missing queue makes the broker close the channel it was
    asked on; here that is a throwaway channel, never the caller's.
    """
    channel = conn.channel()
    try:
        channel.queue_declare(queue, passive=True)
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        try:
            channel.close()
        except CONNECTION_ERRORS:
            log.debug("closing a channel the broker closed", exc_info=True)


def queue_held(conn: kombu.Connection, queue: str) -> bool:
    """Tell whether ``queue`` exists, exclusive to another connection or not.

    For exclusive queues that stand for a process (a multi-node job's gang queues): a
    passive declare answers RESOURCE_LOCKED while their owner's connection lives and
    NOT_FOUND once it is gone. Asked on a throwaway channel, which the broker closes.
    """
    try:
        return queue_exists(conn, queue)
    except amqp.exceptions.ResourceLocked:
        return True


def message(body: bytes, headers: dict[str, Any], **properties: Any) -> amqp.Message:
    """Build a persistent AMQP message."""
    properties.setdefault("delivery_mode", PERSISTENT)
    if body and "content_encoding" not in properties:
        properties["content_encoding"] = "binary"
    return amqp.Message(body, application_headers=headers, **properties)


class Confirms:
    """Publisher confirms on one py-amqp channel, tracked by sequence number.

    ``publish`` never blocks for the confirm: it returns the sequence number, and
    ``on_settled(seq, ok)`` callbacks run from inside ``drain_events`` when the broker
    answers. ``wait_for(seq)`` blocks, for callers that want synchronous confirms.
    Returned (unroutable, mandatory) messages are reported to ``on_return``; a publish
    made with ``settle_returned_as_failed`` (its message needs a ``message_id``) settles
    with ``ok=False`` when it comes back unroutable, so a caller can tell "nobody listens".
    """

    def __init__(self, channel: amqp.Channel,
                 on_return: Callable[[amqp.Message, str], None] | None = None) -> None:
        self.channel = channel
        self._next_seq = 1
        self._pending: dict[int, Callable[[bool], None] | None] = {}
        self._settled: dict[int, bool] = {}
        self._watched: dict[str, int] = {}
        self._watched_ids: dict[int, str] = {}
        self._returned_seqs: set[int] = set()
        self._on_return = on_return
        channel.confirm_select()
        channel.events["basic_ack"].add(self._acked)
        channel.events["basic_nack"].add(self._nacked)
        channel.events["basic_return"].add(self._returned)

    @property
    def outstanding(self) -> int:
        """Return how many publishes await the broker's confirm."""
        return len(self._pending)

    def publish(self, msg: amqp.Message, exchange: str, routing_key: str, *,
                mandatory: bool = True,
                on_settled: Callable[[bool], None] | None = None,
                settle_returned_as_failed: bool = False) -> int:
        """Publish ``msg`` and return its sequence number; the confirm arrives later."""
        seq = self._next_seq
        self._next_seq += 1
        self._pending[seq] = on_settled
        if settle_returned_as_failed:
            msg_id = str(msg.properties["message_id"])
            self._watched[msg_id] = seq
            self._watched_ids[seq] = msg_id
        try:
            self.channel.basic_publish(msg, exchange=exchange, routing_key=routing_key,
                                       mandatory=mandatory)
        except (ValueError, TypeError, OverflowError, LookupError, UnicodeError, struct.error):
            # Raised while encoding, before a byte was sent: the broker never saw this
            # publish, so its sequence number is given back (the confirms stay in step).
            self._pending.pop(seq, None)
            if settle_returned_as_failed:
                self._watched.pop(self._watched_ids.pop(seq, ""), None)
            self._next_seq = seq
            raise
        return seq

    def wait_for(self, seq: int, timeout_s: float = 30.0) -> None:
        """Block until ``seq`` is confirmed; raise PublishNackedError or BrokerError."""
        deadline = time.monotonic() + timeout_s
        conn = self.channel.connection
        while seq in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"no publisher confirm within {timeout_s:.0f} s")
            try:
                conn.drain_events(timeout=min(left, 1.0))
            except TimeoutError:
                continue
        if not self._settled.pop(seq, True):
            raise PublishNackedError("the broker refused the message (basic.nack)")

    def _settle(self, tag: int, multiple: bool, ok: bool) -> None:
        tags = [t for t in self._pending if t <= tag] if multiple else [tag]
        for t in tags:
            t_ok = ok and t not in self._returned_seqs
            self._returned_seqs.discard(t)
            msg_id = self._watched_ids.pop(t, None)
            if msg_id is not None:
                self._watched.pop(msg_id, None)
            callback = self._pending.pop(t, None)
            if callback is not None:
                callback(t_ok)
            elif not t_ok:
                self._settled[t] = t_ok

    def _acked(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, True)

    def _nacked(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, False)

    def _returned(self, exc: Exception, exchange: str, routing_key: str,
                  msg: amqp.Message) -> None:
        reason = getattr(exc, "reply_text", str(exc))
        seq = self._watched.pop(str(msg.properties.get("message_id")), None)
        if seq is not None:
            self._returned_seqs.add(seq)
            return
        if self._on_return is not None:
            self._on_return(msg, f"{reason} (exchange {exchange!r}, key {routing_key!r})")
        else:
            log.warning("message returned by the broker: %s, key %r", reason, routing_key)



def consumer(channel: Any, queues: list[str], *, accept: list[str],
             on_message: Callable[[Any], None]) -> kombu.Consumer:
    """Return a consumer of ``queues`` (declared already) that hands every delivery on.

    kombu prepares a message before ``on_message`` sees it, and raises from inside the
    connection's event loop when it cannot: a foreign ``compression`` header it does not
    know is enough. Here such a message goes to ``on_message`` as it arrived, to be
    judged (and rejected) like any other, instead of breaking the loop.
    """
    return kombu.Consumer(channel, queues=[kombu.Queue(q, no_declare=True) for q in queues],
                          accept=accept, on_message=on_message, no_ack=False,
                          on_decode_error=lambda message, _exc: on_message(message))


def raw_body(message: Any) -> bytes:
    """Return a delivery's body as the bytes that arrived.

    Dispatch's connections hand bodies over undecoded; py-amqp still gives an empty
    body as ``""``, and another transport may have decoded one by its content_encoding.
    """
    body = message.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if not body:
        return b""
    encoding = message.properties.get("content_encoding") or "utf-8"
    try:
        return str(body).encode(encoding, "surrogatepass")
    except (LookupError, UnicodeError):
        return str(body).encode("utf-8", "surrogatepass")


def connection_lost(exc: BaseException, connection: Any) -> bool:
    """Tell whether ``exc`` means the broker connection or channel is gone.

    An OSError can be a job's or the disk's as well as the socket's: it counts as a lost
    connection only when ``connection`` (kombu's or py-amqp's) says it is down.
    """
    if isinstance(exc, amqp.exceptions.ConnectionError | amqp.exceptions.ChannelError
                  | kombu.exceptions.OperationalError):
        return True
    if isinstance(exc, OSError):
        return connection is None or not connection.connected
    return False
