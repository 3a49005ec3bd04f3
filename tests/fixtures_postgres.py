"""A private PostgreSQL per test run, started by pytest-postgresql from Debian's binaries.

As root, ``tests/postgres/pg_ctl`` runs pg_ctl as the ``postgres`` user, and the data
directory lives in a folder that user owns. Each test gets its own database.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import port_for
import psycopg
import pytest
from pytest_postgresql.executors import PostgreSQLExecutor

PG_CTL = Path(__file__).resolve().parent / "postgres" / "pg_ctl"


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgreSQLExecutor]:
    """A PostgreSQL server on a free port, for this run only."""
    base = Path(tempfile.mkdtemp(prefix="dispatch-pg.", dir="/var/tmp"))
    base.chmod(0o755)
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
    server = PostgreSQLExecutor(
        executable=str(PG_CTL), host="127.0.0.1", port=port_for.select_random(),
        datadir=str(base / "data"), unixsocketdir=str(base), logfile=str(base / "pg.log"),
        startparams="-w", dbname="postgres", user="postgres")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server: PostgreSQLExecutor) -> str:
    """The SQLAlchemy URL of a fresh database on the test server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = f"host=127.0.0.1 port={postgresql_server.port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{postgresql_server.port}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger URL on each database Dispatch supports: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgresql_url")
    return url
