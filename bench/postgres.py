"""A private PostgreSQL server for the ledger phases, started from Debian's binaries.

Like the private RabbitMQ node, it lives in a fresh directory on a free port and goes
away with the run, so the bench never touches the machine's own server (port 5432).
As root, every PostgreSQL binary runs as the ``postgres`` user (it refuses root).
Settings are PostgreSQL's defaults (``fsync`` and ``synchronous_commit`` on), as a
production ledger has them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("DISPATCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_S = 60


def installed() -> bool:
    """Tell whether the PostgreSQL binaries the bench needs are here."""
    return all(os.access(PG_BIN / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(argv: list[str]) -> None:
    """Run a PostgreSQL binary, as ``postgres`` when we are root; raise with its output."""
    name = Path(argv[0]).name
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {(done.stderr or done.stdout)[-1500:]}")


@dataclass(frozen=True)
class Server:
    """A running server: its URL without a database, and its data directory."""

    url: str
    data: Path

    def pid(self) -> int:
        """Return the postmaster's pid (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])


@contextlib.contextmanager
def server() -> Iterator[Server]:
    """Start a private server; yield it (``url`` is ``postgresql+psycopg://...:PORT``)."""
    base = Path(tempfile.mkdtemp(prefix="dispatch-bench-pg.", dir="/var/tmp"))
    base.chmod(0o755)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
    data, port = base / "data", _free_port()
    try:
        _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
              "--no-sync", "-E", "UTF8"])
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-o",
              options, "-w", "-t", str(START_TIMEOUT_S), "start"])
        try:
            yield Server(f"postgresql+psycopg://postgres@127.0.0.1:{port}", data)
        finally:
            _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(base, ignore_errors=True)


def create_database(base_url: str, prefix: str = "bench") -> str:
    """Create a fresh database on the server at ``base_url``; return its SQLAlchemy URL."""
    import psycopg  # noqa: PLC0415 - only the ledger phases need it

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    host_port = base_url.rsplit("@", 1)[1]
    host, port = host_port.split(":")
    with psycopg.connect(host=host, port=int(port), user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"
