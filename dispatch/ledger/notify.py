"""Notices of state changes: e-mail through SMTP and/or a JSON POST to a webhook, per job.

A job asks with ``NotifyUser`` (an address) and/or ``NotifyUrl``; ``Notification``
says when: ``Always`` (every change), ``Complete`` (the default: the job is over),
``Error`` (held, rejected, or exited non-zero or by a signal) or ``Never``. Notices
are sent from one background thread; a failure is logged and never stops the ledger.
"""

from __future__ import annotations

import json
import logging
import queue
import smtplib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable
from email.message import EmailMessage
from typing import Any, Protocol

from dispatch.ledger.records import JobRecord, LedgerState
from dispatch.ledger.transitions import StateChange

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class _Reader(Protocol):
    def job(self, job_id: str) -> JobRecord | None: ...


def wanted(job: JobRecord) -> bool:
    """Tell whether ``job`` in its current state asks for a notice."""
    mode = (job.notification or "Complete").capitalize()
    state = job.state
    if mode == "Never" or not (job.notify_user or job.notify_url):
        return False
    if mode == "Always":
        return True
    if mode == "Error":
        failed = job.exit_by_signal or (job.exit_code not in (0, None))
        return state in (LedgerState.HELD, LedgerState.REJECTED) or (
            state is LedgerState.EXITED and bool(failed))
    return state.is_final


def notice(job: JobRecord) -> dict[str, Any]:
    """Return the notice of ``job``'s current state as a JSON-ready map."""
    return {"job_id": job.job_id, "state": job.state.value, "status": job.state.status,
            "owner": job.owner, "pool": job.pool, "attempt": job.attempt, "host": job.host,
            "exit_code": job.exit_code, "exit_by_signal": job.exit_by_signal,
            "exit_signal": job.exit_signal, "duration_s": job.duration_s,
            "reason": job.reason, "job_name": job.job_name, "array_id": job.array_id,
            "array_index": job.array_index}


def subject(job: JobRecord) -> str:
    """Return a one-line summary for a mail subject."""
    how = ""
    if job.state is LedgerState.EXITED:
        how = (f" (signal {job.exit_signal})" if job.exit_by_signal
               else f" (exit {job.exit_code})")
    elif job.reason:
        how = f" ({job.reason})"
    return f"Dispatch job {job.job_name or job.job_id}: {job.state.value}{how}"


class Notifier:
    """Sends notices in the background to ``smtp_url`` (smtp:// or smtps://) and webhooks."""

    def __init__(self, smtp_url: str | None = None, sender: str | None = None) -> None:
        self.smtp_url = smtp_url
        self.sender = sender or f"dispatch@{socket.gethostname()}"
        self._queue: queue.Queue[JobRecord | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def notify(self, ledger: _Reader, changes: Iterable[StateChange]) -> None:
        """Queue a notice for each change whose job wants one."""
        for change in changes:
            job = ledger.job(change.job_id)
            if job is not None and job.state is change.state and wanted(job):
                self._start()
                self._queue.put(job)

    def close(self, timeout_s: float = TIMEOUT_S) -> None:
        """Send what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notices", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self.send(job)

    def send(self, job: JobRecord) -> None:
        """Send ``job``'s notice now, by mail and/or webhook; log failures."""
        if job.notify_user:
            try:
                self._mail(job)
            except (OSError, smtplib.SMTPException, ValueError) as exc:
                log.warning("job %s: notice mail to %s failed: %s", job.job_id,
                            job.notify_user, exc)
        if job.notify_url:
            try:
                post(job.notify_url, notice(job))
            except (OSError, ValueError) as exc:
                log.warning("job %s: webhook notice failed: %s", job.job_id, exc)

    def _mail(self, job: JobRecord) -> None:
        if not self.smtp_url:
            raise ValueError("DISPATCH_SMTP_URL is not set")
        url = urllib.parse.urlsplit(self.smtp_url)
        if url.scheme not in ("smtp", "smtps") or not url.hostname:
            raise ValueError("DISPATCH_SMTP_URL must be smtp://host:port or smtps://host:port")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = self.sender, job.notify_user, subject(job)
        msg.set_content("\n".join(f"{k}: {v}" for k, v in notice(job).items() if v is not None))
        smtp_cls = smtplib.SMTP_SSL if url.scheme == "smtps" else smtplib.SMTP
        with smtp_cls(url.hostname, url.port or 0, timeout=TIMEOUT_S) as smtp:
            if url.username:
                smtp.login(urllib.parse.unquote(url.username),
                           urllib.parse.unquote(url.password or ""))
            smtp.send_message(msg)
        log.info("job %s: notice mailed (%s)", job.job_id, job.state.value)


def post(url: str, payload: dict[str, Any]) -> None:
    """POST ``payload`` as JSON to an http(s) ``url``; raise OSError or ValueError on failure."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"NotifyUrl must be http:// or https://, got {url[:40]!r}")
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",  # noqa: S310 - scheme checked
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
        response.read()
