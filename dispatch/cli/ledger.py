"""``dispatch ledger``: run the ledger service, and the ``--db`` option the query verbs share."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from dispatch.config import DEFAULT_BROKER_URL
from dispatch.ledger.notify import Notifier
from dispatch.ledger.service import LedgerService, ServiceSettings
from dispatch.ledger.store import Ledger
from dispatch.pools import PoolPolicy, PoolsFileError, load_pools
from dispatch.quantity import parse_duration_s
from dispatch.topology import check_pool_name

from .submit import broker_option

log = logging.getLogger(__name__)


def db_option(f: Any) -> Any:
    """Add ``--db`` (default: DISPATCH_LEDGER_URL, else the SQLite file) to a command."""
    return click.option("--db", envvar="DISPATCH_LEDGER_URL", show_envvar=True, metavar="URL",
                        help="Ledger database URL (sqlite:///PATH or "
                             "postgresql+psycopg://USER@HOST/DB).")(f)


def _pool(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(check_pool_name(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _policies(path: str | None) -> dict[str, PoolPolicy]:
    """Read the pools file (at start, not while parsing: a mistake is one line)."""
    if not path:
        return {}
    try:
        return load_pools(Path(path))
    except PoolsFileError as exc:
        raise click.BadParameter(str(exc), param_hint="'--pools'") from None


def _keep(_ctx: click.Context, _param: click.Parameter, value: str) -> float | None:
    if value.strip().lower() == "forever":
        return None
    try:
        seconds = parse_duration_s(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than 0 (or 'forever')")
    return float(seconds)


@click.command("ledger")
@broker_option
@db_option
@click.option("--pool", "pools", multiple=True, callback=_pool,
              help="Track this pool's submissions from the start (repeatable; pools named "
                   "in node heartbeats are tracked too).")
@click.option("--lease-check-s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How often expired leases are looked for (0: leave it to the Celery "
                   "beat task dispatch.ledger.expire_leases).")
@click.option("--batch-max", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most messages applied in one transaction.")
@click.option("--pools", "pools_file", envvar="DISPATCH_POOLS", show_envvar=True,
              metavar="PATH",
              help="Pools file: each pool's fallback pools by job kind (mpi, serial, smp) "
                   "and fallback_after; jobs of a pool with no live node are rerouted.")
@click.option("--fallback-check-s", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="How often pools with no live node are looked at.")
@click.option("--keep", "keep_s", default="90d", show_default=True, callback=_keep,
              metavar="DURATION",
              help="How long finished jobs stay in the ledger (and in 'dispatch history'), "
                   "e.g. 30d, 12h; 'forever' keeps them all. Purged at start, then hourly.")
def ledger_command(broker: str | None, db: str | None, pools: tuple[str, ...],
                   lease_check_s: float, batch_max: int, pools_file: str | None,
                   fallback_check_s: float, keep_s: float | None) -> None:
    """Record every job and node from the event stream; re-dispatch expired leases."""
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    policies = _policies(pools_file)
    admins = frozenset(a.strip() for a in os.environ.get("DISPATCH_ADMINS", "").split(",")
                       if a.strip())
    settings = ServiceSettings(broker_url=broker or DEFAULT_BROKER_URL, pools=pools,
                               lease_check_s=lease_check_s, batch_max=batch_max, admins=admins,
                               keep_s=keep_s, policies=policies,
                               fallback_check_s=fallback_check_s)
    ledger = Ledger.open(db)
    notifier = Notifier(os.environ.get("DISPATCH_SMTP_URL") or None,
                        os.environ.get("DISPATCH_SMTP_FROM") or None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"dispatch ledger: database {ledger.engine.url.render_as_string()}", err=True)
    try:
        LedgerService(settings, ledger, notifier).run(stop)
    finally:
        notifier.close()
        ledger.close()
