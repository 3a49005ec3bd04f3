"""``dispatch shutdown``: every node of some pools (or all) stops, as openstack-queue's qterm.

One control message goes to the control exchange with key ``nodes.shutdown``, which
every node's control queue is bound to: ``{op: shutdown, pools, requeue, reason, by,
at}``, with the sender's ``user_id`` (the broker checks it) and a ``reply_to`` on a
private queue. Nodes obey only their own broker user and their ``--admin`` users; each
node the order is for answers what it did, or why it refused. A user the broker does
not let publish there (``dispatch users add`` makes such users) is refused at once.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

import amqp
import click

from dispatch import broker, events, topology
from dispatch.config import Settings
from dispatch.errors import BrokerError
from dispatch.events import ControlOp

from .submit import broker_option

EXIT_REFUSED = 1
#: Once some node answered, how long a silence means every node has.
QUIET_S = 1.0


class ShutdownRefusedError(BrokerError):
    """Raised when the broker refuses the sender's shutdown (not an admin)."""


def send_shutdown(broker_url: str, body: dict[str, Any], *, timeout_s: float,
                  expect: int | None) -> list[dict[str, Any]]:
    """Publish a shutdown order; return the nodes' answers (see the module docstring)."""
    conn = broker.connect(broker_url)
    try:
        user = str(conn.userid)
        channel = conn.default_channel
        answers: list[dict[str, Any]] = []
        returned: list[str] = []
        cid = uuid.uuid4().hex
        with broker.translated("sending the shutdown"):
            queue = topology.reply_queue(f"{user}-ctl-{uuid.uuid4().hex[:12]}")
            channel.queue_declare(queue, durable=False, exclusive=True, auto_delete=True)
            channel.basic_consume(queue, no_ack=True, callback=lambda m: _collect(
                m, cid, answers))
            confirms = broker.Confirms(channel, on_return=lambda _m, d: returned.append(d))
            msg = broker.message(events.encode({**body, "by": user, "at": events.now()}), {},
                                 content_type=events.CONTENT_TYPE, user_id=user,
                                 reply_to=queue, correlation_id=cid, delivery_mode=2)
            try:
                confirms.wait_for(confirms.publish(msg, topology.control_exchange(),
                                                   events.control_key(ControlOp.SHUTDOWN)))
            except amqp.exceptions.AccessRefused:
                raise ShutdownRefusedError(
                    f"permission denied: shutdown is for admins; the broker does not let "
                    f"{user} send control messages") from None
            except amqp.exceptions.NotFound:
                raise BrokerError("no node listens for control messages (none has "
                                  "started)") from None
            if returned:
                raise BrokerError("no node listens for control messages (none has started)")
            _wait_answers(conn, answers, timeout_s, expect)
        return answers
    finally:
        conn.release()


def _collect(message: amqp.Message, cid: str, answers: list[dict[str, Any]]) -> None:
    if message.properties.get("correlation_id") == cid:
        answers.append(events.decode(message.body, what="control"))


def _wait_answers(conn: Any, answers: list[dict[str, Any]], timeout_s: float,
                  expect: int | None) -> None:
    deadline = time.monotonic() + timeout_s
    seen, quiet_until = 0, deadline
    while time.monotonic() < min(deadline, quiet_until):
        if expect is not None and len(answers) >= expect:
            return
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)
        if len(answers) > seen and expect is None:
            seen, quiet_until = len(answers), time.monotonic() + QUIET_S


@click.command("shutdown")
@click.option("--pool", "pools", multiple=True, metavar="POOL",
              help="Shut down the nodes serving POOL (repeatable).")
@click.option("--all", "all_nodes", is_flag=True, help="Shut down every node.")
@click.option("--requeue", is_flag=True, help="Kill running jobs and hand them back to the "
              "queue, so other nodes rerun them (default: the nodes finish them).")
@click.option("--reason", help="Why (in the nodes' offline reason and logs).")
@click.option("--expect", type=click.IntRange(min=1), metavar="N",
              help="Stop waiting for answers once N nodes answered.")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the nodes' answers.")
@click.option("--json", "as_json", is_flag=True, help="Print each node's answer as JSON.")
@broker_option
@click.pass_context
def shutdown_command(ctx: click.Context, pools: tuple[str, ...], all_nodes: bool,
                     requeue: bool, reason: str | None, expect: int | None, timeout_s: float,
                     as_json: bool, broker: str | None) -> None:
    """Stop the nodes of POOLs (or --all): no new jobs; running ones finish, or are requeued.

    Admins only (the broker users the nodes obey). Like openstack-queue's qterm.
    """
    if bool(pools) == all_nodes:
        raise click.UsageError("give --pool POOL (repeatable) or --all")
    for pool in pools:
        try:
            topology.check_pool_name(pool)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--pool") from None
    body = {"op": ControlOp.SHUTDOWN.value, "pools": list(pools), "requeue": requeue,
            "reason": reason}
    url = broker or Settings.from_env().broker_url
    try:
        answers = send_shutdown(url, body, timeout_s=timeout_s, expect=expect)
    except ShutdownRefusedError as exc:
        click.echo(f"dispatch: error: {exc}", err=True)
        ctx.exit(EXIT_REFUSED)
    ctx.exit(_report(answers, as_json))


def _report(answers: list[dict[str, Any]], as_json: bool) -> int:
    for answer in answers if as_json else ():
        click.echo(json.dumps(answer))
    ok = [a for a in answers if a.get("ok")]
    refused = [a for a in answers if not a.get("ok")]
    if not as_json:
        for a in ok:
            back = a.get("requeued") or []
            done = f"{len(back)} job(s) requeued" if back else (
                f"finishing {a.get('running', 0)} running job(s)")
            click.echo(f"{a.get('node')}: shutting down, {done}")
        if not answers:
            click.echo("dispatch: error: no node answered (none serves these pools?)",
                       err=True)
        elif refused:
            click.echo(f"dispatch: error: permission denied: {refused[0].get('error')}"
                       + (f" (and {len(refused) - 1} more node(s))" if len(refused) > 1
                          else ""), err=True)
    return 0 if ok and not refused else EXIT_REFUSED
