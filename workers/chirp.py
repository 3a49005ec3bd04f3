"""The node's end of chirp: one local datagram socket for every job it runs.

Jobs run as an unprivileged account, so the socket is world-writable; a per-job
random token (in the job's environment) says which job a datagram comes from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

from dispatch import chirp
from dispatch.errors import InvalidMessageError

log = logging.getLogger(__name__)


class ChirpSocket:
    """Receives attribute updates from running jobs; read it when the selector says so."""

    def __init__(self, directory: Path, node: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f".chirp.{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.path.chmod(0o666)  # jobs run as another account
        self._jobs: dict[str, str] = {}

    def fileno(self) -> int:
        """Return the socket's descriptor, for the node's selector."""
        return self.sock.fileno()

    def enrol(self, job_id: str) -> dict[str, str]:
        """Return the environment that lets ``job_id`` chirp."""
        token = secrets.token_hex(16)
        self._jobs[token] = job_id
        return {chirp.SOCKET_ENV: str(self.path), chirp.TOKEN_ENV: token}

    def forget(self, job_id: str) -> None:
        """Stop accepting attributes from a job that has finished."""
        for token in [t for t, j in self._jobs.items() if j == job_id]:
            del self._jobs[token]

    def receive(self) -> list[tuple[str, str, str]]:
        """Return the ``(job_id, name, value)`` updates waiting on the socket."""
        updates: list[tuple[str, str, str]] = []
        while True:
            try:
                data = self.sock.recv(chirp.MAX_DATAGRAM_BYTES + 1)
            except BlockingIOError:
                return updates
            try:
                token, name, value = chirp.decode(data)
            except InvalidMessageError as exc:
                log.warning("chirp: ignoring a bad datagram: %s", exc)
                continue
            job_id = self._jobs.get(token)
            if job_id is None:
                log.warning("chirp: ignoring attribute %s with an unknown token", name)
                continue
            updates.append((job_id, name, value))

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
