"""``dispatch rm|hold|release JOBID...``: ask the ledger, which checks that the jobs are yours.

The request goes to the ledger's control queue with ``user_id`` set to the broker
user of the URL (the broker refuses any other), and the answer comes back on a
private, exclusive reply queue ``dispatch.reply.<user>-ctl-<random>``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import amqp
import click

from dispatch import broker, events, topology
from dispatch.config import Settings
from dispatch.errors import BrokerError, JobTimeoutError
from dispatch.events import ControlOp

from .submit import broker_option

EXIT_REFUSED = 1


def request_control(broker_url: str, op: ControlOp, job_ids: list[str], reason: str | None,
                    timeout_s: float) -> dict[str, Any]:
    """Send one control request to the ledger and return its answer."""
    conn = broker.connect(broker_url)
    try:
        user = str(conn.userid)
        channel = conn.default_channel
        answers: list[amqp.Message] = []
        returned: list[str] = []
        with broker.translated("sending the control request"):
            queue = topology.reply_queue(f"{user}-ctl-{uuid.uuid4().hex[:12]}")
            channel.queue_declare(queue, durable=False, exclusive=True, auto_delete=True)
            channel.basic_consume(queue, callback=answers.append, no_ack=True)
            confirms = broker.Confirms(channel, on_return=lambda _m, d: returned.append(d))
            cid = uuid.uuid4().hex
            body = {"op": op.value, "job_ids": job_ids, "reason": reason}
            msg = broker.message(events.encode(body), {}, content_type=events.CONTENT_TYPE,
                                 user_id=user, reply_to=queue, correlation_id=cid)
            confirms.wait_for(confirms.publish(msg, "", topology.ledger_control_queue()))
        if returned:
            raise BrokerError("no ledger: queue dispatch.ledger.control does not exist "
                              "(start `dispatch ledger`)")
        return _answer(conn, answers, cid, timeout_s)
    finally:
        conn.release()


def _answer(conn: Any, answers: list[amqp.Message], cid: str,
            timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        for msg in answers:
            if msg.properties.get("correlation_id") == cid:
                return events.decode(msg.body, what="control")
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobTimeoutError(f"no answer from the ledger within {timeout_s:g} s")
        try:
            with broker.translated("waiting for the ledger's answer"):
                conn.drain_events(timeout=min(left, 1.0))
        except TimeoutError:
            continue


def _verb(op: ControlOp, name: str, summary: str) -> click.Command:
    @click.command(name, help=summary)
    @click.argument("job_ids", nargs=-1, required=True)
    @click.option("--reason", help="Why (kept in the ledger and shown by q/explain).")
    @click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
                  help="Seconds to wait for the ledger's answer.")
    @click.option("--json", "as_json", is_flag=True, help="Print the ledger's answer as JSON.")
    @broker_option
    @click.pass_context
    def command(ctx: click.Context, job_ids: tuple[str, ...], reason: str | None,
                timeout_s: float, as_json: bool, broker: str | None) -> None:
        url = broker or Settings.from_env().broker_url
        reply = request_control(url, op, list(job_ids), reason, timeout_s)
        if as_json:
            click.echo(json.dumps(reply))
        elif reply.get("error"):
            click.echo(f"dispatch: error: {reply['error']}", err=True)
        for result in reply.get("results", []) if not as_json else ():
            if result.get("ok"):
                click.echo(f"{result['job_id']}: {op.value} accepted ({result.get('state')})")
            else:
                click.echo(f"dispatch: error: {result['job_id']}: {result.get('error')}",
                           err=True)
        ctx.exit(0 if reply.get("ok") else EXIT_REFUSED)

    return command


rm_command = _verb(ControlOp.REMOVE, "rm", "Remove jobs: queued ones are dropped, running "
                   "ones killed (KillSig, then SIGKILL).")
hold_command = _verb(ControlOp.HOLD, "hold", "Hold jobs: they do not run until released "
                     "(a running one is stopped).")
release_command = _verb(ControlOp.RELEASE, "release", "Release held jobs: they are sent out "
                        "again as a new attempt.")
