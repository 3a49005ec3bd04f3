"""Notices: real mail to a local aiosmtpd server and real JSON POSTs to a local http.server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import port_for
import pytest
from aiosmtpd.controller import Controller
from ledger_events import job, request

from dispatch.events import Event
from dispatch.ledger import JobRecord, Ledger, LedgerState
from dispatch.ledger.notify import Notifier, wanted


class Mailbox:
    """An aiosmtpd handler keeping what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[str, Mailbox]]:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=port_for.select_random())
    controller.start()
    yield f"smtp://127.0.0.1:{controller.port}", box
    controller.stop()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


def _wait(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _run(led: Ledger, notifier: Notifier, job_id: str, exit_code: int, **hdrs: Any) -> None:
    req = request(job_id, **hdrs)
    for body in (job(Event.CLAIMED, job_id, request=req), job(Event.RUNNING, job_id, t=1),
                 job(Event.EXITED, job_id, t=2, exit_code=exit_code)):
        notifier.notify(led, led.apply_batch([body]).effects.changes)


def test_a_finished_job_mails_its_owner_and_posts_to_its_webhook(tmp_path, smtp, webhook):
    smtp_url, box = smtp
    url, posts = webhook
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    notifier = Notifier(smtp_url, "ledger@example.org")
    try:
        _run(led, notifier, "n1", 3, NotifyUser="alice@example.org", NotifyUrl=url)
        notifier.close()
    finally:
        led.close()
    ((rcpts, mail),) = box.messages  # Complete (the default): only the final state
    assert rcpts == ["alice@example.org"] and mail["From"] == "ledger@example.org"
    assert mail["Subject"] == "Dispatch job n1: Exited (exit 3)"
    assert "exit_code: 3" in mail.get_payload()
    (post,) = posts
    assert (post["job_id"], post["state"], post["exit_code"], post["status"]) == (
        "n1", "Exited", 3, 4)


def test_always_sends_every_change_and_error_only_failures(tmp_path, webhook):
    url, posts = webhook
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    notifier = Notifier()
    try:
        _run(led, notifier, "a1", 0, NotifyUrl=url, Notification="Always")
        _run(led, notifier, "e1", 0, NotifyUrl=url, Notification="Error")
        _run(led, notifier, "e2", 1, NotifyUrl=url, Notification="Error")
        _run(led, notifier, "never", 1, NotifyUrl=url, Notification="Never")
        notifier.close()
    finally:
        led.close()
    assert [(p["job_id"], p["state"]) for p in posts] == [
        ("a1", "Claimed"), ("a1", "Running"), ("a1", "Exited"), ("e2", "Exited")]


def test_failing_notices_are_logged_and_nothing_else_happens(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dispatch.ledger.notify")
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    dead = port_for.select_random()
    notifier = Notifier(f"smtp://127.0.0.1:{dead}")
    try:
        _run(led, notifier, "f1", 0, NotifyUser="x@example.org",
             NotifyUrl=f"http://127.0.0.1:{dead}/hook")
        notifier.close()
        assert led.job("f1").state is LedgerState.EXITED
    finally:
        led.close()
    assert "f1: notice mail to x@example.org failed" in caplog.text
    assert "f1: webhook notice failed" in caplog.text


def test_the_ledger_service_sends_notices(ledger_service, wire, smtp, webhook):
    smtp_url, box = smtp
    url, posts = webhook
    ledger_service.start(env={"DISPATCH_SMTP_URL": smtp_url})
    req = request("s1", NotifyUser="bob@example.org", NotifyUrl=url)
    wire.publish_event(job(Event.CLAIMED, "s1", request=req))
    wire.publish_event(job(Event.EXITED, "s1", t=1, exit_by_signal=True, exit_signal=9,
                           exit_code=None))
    _wait(lambda: box.messages and posts)
    assert box.messages[0][1]["Subject"] == "Dispatch job s1: Exited (signal 9)"
    assert posts[0]["exit_signal"] == 9


def test_notice_policy_defaults_to_complete():
    base = JobRecord("j", "o", "p", LedgerState.RUNNING, 1, 3, notify_user="a@b")
    assert not wanted(base)
    assert wanted(JobRecord("j", "o", "p", LedgerState.REMOVED, 1, 3, notify_user="a@b"))
    assert not wanted(JobRecord("j", "o", "p", LedgerState.EXITED, 1, 3))
