"""One SSH host's link: a single connection reused by every job, up, or down and retried.

Each host has one paramiko Transport; every job opens a session channel on it (no
handshake per job). The host key is checked against the hosts file's known_hosts with
paramiko's RejectPolicy: an unknown or changed key keeps the host down, never accepted.
Connecting happens on a short-lived thread, so a host that does not answer never stalls
the node's loop; the loop learns of the result through :meth:`HostLink.check` (and is
woken by ``wake``). A host that cannot be reached is retried with a doubling backoff.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paramiko

from workers.machine import Machine
from workers.slots import Slots
from workers.sshhosts import SshHost

log = logging.getLogger(__name__)

__all__ = ["HostLink"]

CONNECT_TIMEOUT_S = 10.0
CHANNEL_TIMEOUT_S = 10.0
KEEPALIVE_S = 5
FIRST_BACKOFF_S = 0.5

_ARCH = {"x86_64": "X86_64", "aarch64": "AARCH64", "i686": "INTEL", "ppc64le": "PPC64LE"}


class HostLink:
    """One SSH host: its connection, its slots, and whether it is up."""

    def __init__(self, host: SshHost, pools: Sequence[str], *, wake: Callable[[], None],
                 reconnect_max_s: float = 30.0) -> None:
        self.host = host
        self.name = host.name
        self.machine = Machine(cpus=host.cores, memory_mb=host.memory_mb, disk_mb=0,
                               arch="", opsys="", name=host.name, groups=host.groups,
                               pools=tuple(pools))
        self.attrs = self.machine.attributes()
        self.slots = Slots(self.machine)
        self.up = False
        #: Why the host is down (None while up or before the first attempt ends).
        self.down_reason: str | None = None
        self.jobs_done = 0
        self.last_job_at: str | None = None
        self._wake = wake
        self._reconnect_max_s = reconnect_max_s
        self._backoff_s = FIRST_BACKOFF_S
        self._next_try = 0.0
        self._client: paramiko.SSHClient | None = None
        self._attempt: threading.Thread | None = None
        self._result: tuple[paramiko.SSHClient | None, str | None, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<HostLink {self.name} {'up' if self.up else 'down'}>"

    # -- the loop's side ----------------------------------------------------------------

    def check(self, now: float) -> str | None:
        """Notice a connection made, lost or failed; return ``"up"``/``"down"`` on a change."""
        with self._lock:
            result, self._result = self._result, None
        if result is not None:
            self._attempt = None
            client, error, attrs = result
            if client is not None:
                self._client = client
                self.attrs.update(attrs)
                self.up, self.down_reason = True, None
                log.info("host %s: connected to %s", self.name, self._where())
                return "up"
            self._next_try = now + self._backoff_s
            log.warning("host %s: %s; next try in %.1fs", self.name, error, self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, self._reconnect_max_s)
            changed = self.down_reason is None
            self.down_reason = error
            return "down" if changed else None
        if self.up and not self._transport_active():
            return self.lost("the SSH connection dropped")
        if not self.up and self._attempt is None and now >= self._next_try:
            self._attempt = threading.Thread(target=self._connect, name=f"ssh-{self.name}",
                                             daemon=True)
            self._attempt.start()
        return None

    def lost(self, reason: str) -> str | None:
        """Mark the host down (a job's channel or the connection failed); retry later."""
        if self._client is not None:
            self._client.close()
            self._client = None
        was_up = self.up
        self.up = False
        self.down_reason = reason
        self._next_try = time.monotonic() + self._backoff_s
        if was_up:
            log.warning("host %s: down: %s", self.name, reason)
        return "down" if was_up else None

    def confirmed(self) -> None:
        """A job ran to its end here: the next outage starts its backoff afresh."""
        self._backoff_s = FIRST_BACKOFF_S

    def open_session(self, command: str) -> paramiko.Channel:
        """Start ``command`` on a new session channel; raise OSError if the host fails."""
        transport = self._client.get_transport() if self._client is not None else None
        if transport is None or not transport.is_active():
            raise ConnectionError(f"host {self.name} is not connected")
        try:
            channel = transport.open_session(timeout=CHANNEL_TIMEOUT_S)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError) as exc:
            raise ConnectionError(f"host {self.name}: cannot start a session: {exc}") from None
        return channel

    def close(self) -> None:
        """Close the connection (jobs still running on it are killed by their wrapper)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self.up = False

    # -- the connecting thread ----------------------------------------------------------

    def _connect(self) -> None:
        host = self.host
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(host.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(host.host, port=host.port, username=host.user,
                           key_filename=str(host.key_file), timeout=CONNECT_TIMEOUT_S,
                           banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S,
                           look_for_keys=False, allow_agent=False)
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(KEEPALIVE_S)
                # Jobs are small writes awaiting replies: Nagle would hold each one back.
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            attrs = _platform(client)
            outcome: tuple[paramiko.SSHClient | None, str | None, dict[str, str]] = (
                client, None, attrs)
        except paramiko.BadHostKeyException:
            client.close()
            outcome = (None, f"{self._where()} offered a host key that differs from the one "
                       f"in {host.known_hosts}", {})
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            outcome = (None, f"cannot connect to {self._where()}: {_describe(exc)}", {})
        with self._lock:
            self._result = outcome
        self._wake()

    def _transport_active(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and bool(transport.is_active())

    def _where(self) -> str:
        return f"{self.host.user}@{self.host.host}:{self.host.port}"


def _platform(client: paramiko.SSHClient) -> dict[str, str]:
    """Return the host's ``Arch`` and ``OpSys`` from ``uname -sm`` (once per connection)."""
    _, stdout, _ = client.exec_command("uname -sm", timeout=CHANNEL_TIMEOUT_S)
    words = stdout.read().decode("ascii", "replace").split()
    if len(words) != 2:
        return {}
    system, machine = words
    return {"OpSys": system.upper(), "Arch": _ARCH.get(machine.lower(), machine.upper())}


def _describe(exc: Any) -> str:
    text = str(exc) or type(exc).__name__
    if "not found in known_hosts" in text:
        return f"{text}; refusing an unknown host key"
    return text
