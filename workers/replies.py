"""Replies and dead letters, published with asynchronous publisher confirms.

A final result goes out as one reply while its archive is at most ``max_result_bytes``;
a larger one as ordered chunk messages and then the one final reply (see
:mod:`dispatch.chunks`), paced by the broker's confirms. A result whose reply comes back
unroutable is kept on the node's spool (:mod:`workers.spool`), never lost.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable
from typing import Any

import amqp
import amqp.exceptions

from dispatch import broker, headers, topology
from dispatch.archive import ZIP_CONTENT_TYPE
from dispatch.chunks import CHUNK_CONTENT_TYPE
from dispatch.errors import DispatchError
from dispatch.job import JobState
from workers.spool import Packed

log = logging.getLogger(__name__)

Settle = Callable[[bool], None]
#: delivery_mode of a message the broker keeps in memory only.
TRANSIENT = 1
#: Chunks of one result awaiting their confirm at once.
CHUNK_WINDOW = 2
#: Bytes of a content-header frame besides its properties (frame header and end,
#: class, weight, body size).
_HEADER_FRAME_OVERHEAD = 8 + 12


class Replies:
    """Publishes a node's replies on one confirm-mode channel; never waits for the broker."""

    def __init__(self, channel: amqp.Channel, host: str) -> None:
        self.host = host
        self.confirms = broker.Confirms(channel, on_return=self._returned)
        #: Final results awaiting their confirms, by (job id, attempt).
        self.results: dict[tuple[str, int], _Delivery] = {}
        #: Whether exchanges named by foreign reply addresses exist.
        self._exchanges: dict[str, bool] = {}

    def reachable(self, reply_to: topology.ReplyAddress) -> bool:
        """Tell whether ``reply_to``'s exchange exists (asked once per exchange and connection).

        A publish to an exchange that does not exist closes the channel it was made on,
        so a foreign ``/exchange/NAME/KEY`` address is checked on a channel of its own
        before anything is published to it.
        """
        name = reply_to.exchange
        if not name:
            return True
        known = self._exchanges.get(name)
        if known is None:
            channel = self.confirms.channel.connection.channel()
            try:
                channel.exchange_declare(name, "direct", passive=True)
                known = True
            except amqp.exceptions.NotFound:
                known = False
            except amqp.exceptions.ChannelError:
                known = False  # not a name the broker accepts
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            if len(self._exchanges) >= 1024:
                self._exchanges.clear()
            self._exchanges[name] = known
        return known

    def send(self, env: headers.Envelope, state: JobState, body: bytes, *,
             settle: Settle | None = None, **fields: Any) -> None:
        """Publish one reply to the job's ``reply_to``; ``settle(ok)`` runs on the confirm."""
        if env.reply_to is None:
            raise ValueError(f"job {env.job_id}: no reply address")
        props: dict[str, Any] = {"correlation_id": env.correlation_id, "message_id": env.job_id}
        if body:
            props["content_type"] = ZIP_CONTENT_TYPE
        if state is JobState.RUNNING:
            # Advisory: the final reply (and, with a ledger, the claim) is the durable
            # record, so Running is not written to disk by the broker.
            props["delivery_mode"] = TRANSIENT
        self.publish(env, body, headers.reply_headers(state, env, **fields), props, settle)

    def publish(self, env: headers.Envelope, body: bytes, hdrs: dict[str, Any],
                props: dict[str, Any], settle: Settle | None) -> None:
        """Publish a message with ``hdrs`` and ``props`` to the job's ``reply_to``."""
        if env.reply_to is None:
            raise ValueError(f"job {env.job_id}: no reply address")
        msg = broker.message(body, hdrs, **props)
        self.confirms.publish(msg, env.reply_to.exchange, env.reply_to.routing_key,
                              on_settled=settle)

    def send_result(self, env: headers.Envelope, state: JobState, archive: bytes | Packed, *,
                    settle: Settle, **fields: Any) -> None:
        """Publish a job's final reply with its archive; ``settle(ok)`` once it is safe.

        Safe means confirmed by the broker, every chunk included, or kept on the spool
        when the reply came back unroutable. Without ``reply_to`` the archive is dropped.
        """
        if env.reply_to is None:
            if isinstance(archive, Packed):
                archive.close()
            settle(True)
            return
        if not isinstance(archive, Packed):
            self.send(env, state, archive, settle=settle, **fields)
            return
        kind = _Chunked if archive.is_large else _Whole
        delivery = kind(self, env, state=state, archive=archive, settle=settle, fields=fields)
        self.results[(env.job_id, env.attempt)] = delivery
        delivery.start()

    def dead_letter(self, message: Any, reason: str, *, settle: Settle) -> None:
        """Publish a copy of a rejected job message, with the reason, to the dead-letter exchange.

        The body goes on byte for byte. The original is acked only once this copy is
        confirmed (``settle(True)``). A copy that cannot be made (its headers do not fit
        one frame, or do not encode) or that the broker refuses settles ``False``: the
        caller keeps the message some other way.
        """
        msg = self._dead_letter_copy(message, reason)
        if msg is None:
            settle(False)
            return
        self.confirms.publish(msg, topology.dead_letter_exchange(), "", on_settled=settle)

    def _dead_letter_copy(self, message: Any, reason: str) -> amqp.Message | None:
        # The broker refuses a user_id that is not the publisher's own: the owner
        # travels on as a header instead.
        props = {k: v for k, v in message.properties.items()
                 if k not in ("application_headers", "expiration", "user_id") and v is not None}
        info = message.delivery_info
        extra = {
            headers.REASON: reason,
            "x-original-user-id": message.properties.get("user_id") or "",
            "x-dispatch-rejected-by": self.host,
            "x-original-exchange": info.get("exchange", ""),
            "x-original-routing-key": info.get("routing_key", ""),
        }
        body = broker.raw_body(message)
        original = message.headers or {}
        for hdrs in ({**original, **extra}, {**_as_text(original), **extra}):
            msg = amqp.Message(body, application_headers=hdrs, **props)
            try:
                size = len(msg._serialize_properties())
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                log.warning("dead-letter copy: headers do not encode (%s)", exc)
                continue
            if size + _HEADER_FRAME_OVERHEAD <= self.frame_max:
                return msg
            log.warning("dead-letter copy: %d bytes of properties do not fit a frame", size)
            return None
        return None

    @property
    def frame_max(self) -> int:
        """Return the largest frame the connection carries (a content header must fit one)."""
        return int(self.confirms.channel.connection.frame_max)

    def _returned(self, msg: amqp.Message, detail: str) -> None:
        raw = msg.properties.get("application_headers") or {}
        try:
            hdrs, _ = headers.normalize(raw)
        except DispatchError:
            hdrs = {}
        job_id = hdrs.get(headers.JOB_ID)
        delivery = self.results.get((str(job_id), _attempt(hdrs.get(headers.ATTEMPT))))
        if delivery is not None and hdrs.get(headers.JOB_STATE) != JobState.RUNNING.value:
            delivery.returned(msg, detail)  # the confirm that follows settles it
            return
        log.warning("job %s: reply could not be delivered: %s", job_id, detail)


def _as_text(table: dict[Any, Any]) -> dict[str, Any]:
    """Return a header table whose values py-amqp can surely encode (odd ones as text)."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str | bytes):
            return value
        if isinstance(value, dict):
            return _as_text(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return str(value)

    return {(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k))[:255]:
            plain(v) for k, v in table.items()}


def _attempt(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


class _Delivery:
    """One final result on its way: published, then settled once safe."""

    def __init__(self, replies: Replies, env: headers.Envelope, *, state: JobState,
                 archive: Packed, settle: Settle, fields: dict[str, Any]) -> None:
        self.replies = replies
        self.env = env
        self.state = state
        self.archive = archive
        self.settle = settle
        self.fields = fields
        self.bounced: str | None = None

    def start(self) -> None:
        """Publish what the result needs."""
        raise NotImplementedError

    def returned(self, msg: amqp.Message, detail: str) -> None:
        """Note that a message of this result came back unroutable."""
        self.bounced = self.bounced or detail

    def final_headers(self) -> dict[str, Any]:
        """Return the headers of the final reply."""
        return headers.reply_headers(self.state, self.env, **self.fields)

    def props(self, content_type: str | None) -> dict[str, Any]:
        """Return the properties of one of this result's messages."""
        props: dict[str, Any] = {"correlation_id": self.env.correlation_id,
                                 "message_id": self.env.job_id}
        if content_type:
            props["content_type"] = content_type
        return props

    def finish(self, ok: bool) -> None:
        """Settle the job: safe if confirmed, or bounced and kept on the spool."""
        key = (self.env.job_id, self.env.attempt)
        if self.replies.results.get(key) is self:
            del self.replies.results[key]
        try:
            if self.bounced is not None:
                ok = self._keep(self.final_headers())
            self.settle(ok)
        finally:
            self.archive.close()

    def _keep(self, final_headers: dict[str, Any]) -> bool:
        job_id = self.env.job_id
        reply_to = self.env.reply_to
        meta = {"job_id": job_id, "attempt": self.env.attempt, "returned": self.bounced,
                "reply_to": {"exchange": reply_to.exchange if reply_to else "",
                             "routing_key": reply_to.routing_key if reply_to else ""},
                "properties": {**self.props(ZIP_CONTENT_TYPE), "delivery_mode": 2},
                "headers": final_headers, "result_bytes": self.archive.size}
        try:
            path = self.archive.keep(job_id, meta)
        except OSError as exc:
            log.error("job %s: reply undeliverable (%s) and the spool failed: %s; requeueing",
                      job_id, self.bounced, exc)
            return False
        log.warning("job %s: reply undeliverable (%s); result kept in %s (headers in %s)",
                    job_id, self.bounced, path, path.with_suffix(".json").name)
        return True


class _Whole(_Delivery):
    """A result within ``max_result_bytes``: one reply, exactly as it always was."""

    def start(self) -> None:
        """Publish the final reply with the archive as its body."""
        body = self.archive.body()
        self.replies.publish(self.env, body, self.final_headers(),
                             self.props(ZIP_CONTENT_TYPE if body else None), self.finish)


class _Chunked(_Delivery):
    """A result over ``max_result_bytes``: chunks (a few awaiting confirms), then the reply."""

    def __init__(self, replies: Replies, env: headers.Envelope, **kwargs: Any) -> None:
        super().__init__(replies, env, **kwargs)
        self.splitter = self.archive.splitter()
        self.in_flight = 0
        self.nacked = False
        self.ended = False
        self.filling = False

    def start(self) -> None:
        """Publish the first chunks; each confirm publishes the next."""
        log.info("job %s: result of %d bytes goes in %d chunks", self.env.job_id,
                 self.archive.size, self.splitter.count)
        self._fill()

    def _fill(self) -> None:
        # py-amqp may read confirms while it publishes (to notice connection.blocked), so
        # a confirm can call this again mid-publish: only the outer call publishes, which
        # keeps the chunks in order.
        if self.filling:
            return
        self.filling = True
        try:
            while self.in_flight < CHUNK_WINDOW and self.bounced is None and not self.nacked:
                item = self.splitter.next()
                if item is None:
                    break
                place, data = item
                hdrs = place.to_headers(self.env.job_id, self.env.attempt,
                                        quoted=self.env.classad_quoted)
                self.in_flight += 1
                self.replies.publish(self.env, data, hdrs, self.props(CHUNK_CONTENT_TYPE),
                                     self._chunk_settled)
        finally:
            self.filling = False
        if self.in_flight == 0 and not self.ended:
            self.ended = True
            self._after_chunks()

    def _chunk_settled(self, ok: bool) -> None:
        self.in_flight -= 1
        self.nacked = self.nacked or not ok
        self._fill()

    def _after_chunks(self) -> None:
        if self.bounced is not None or self.nacked:
            self.finish(False)
            return
        hdrs = {**self.final_headers(), **self.splitter.summary().to_headers()}
        self.replies.publish(self.env, b"", hdrs, self.props(None), self.finish)

    def final_headers(self) -> dict[str, Any]:
        """Return the final reply's headers, with the archive's size."""
        return {**super().final_headers(), headers.RESULT_BYTES: self.archive.size}
