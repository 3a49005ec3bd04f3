"""The Celery tasks: reap, provision, autoscale, bootstrap, expire leases. Each takes its lock, so
beats may overlap.

The work itself lives in plain modules (:mod:`workers.cloud.reaper`,
:mod:`workers.cloud.provisioner`, :mod:`workers.cloud.scaler`); the tasks connect,
lock, call them and return a JSON summary.
"""

from __future__ import annotations

import logging
from typing import Any

from dispatch import broker
from dispatch.ledger.leases import expire_leases
from dispatch.ledger.publisher import AmqpPublisher
from dispatch.ledger.store import Ledger, utcnow
from workers.cloud import lock, reaper, scaler
from workers.cloud.app import (
    AUTOSCALE_TASK,
    BOOTSTRAP_TASK,
    LEASES_TASK,
    PROVISION_TASK,
    REAP_TASK,
    app,
)
from workers.cloud.errors import LockBusyError
from workers.cloud.flavors import Need
from workers.cloud.provisioner import Order, bootstrap_server, provision
from workers.cloud.servers import Cloud
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)


def connect(settings: CloudSettings) -> Cloud:
    """Return a connection to the configured cloud."""
    return Cloud.connect(settings.require_clouds_yaml(), settings.cloud)


def run_reap(dry_run: bool = False) -> list[dict[str, str]]:
    """Reap once under the reap lock; return what was (or would be) done."""
    settings = CloudSettings.from_env()
    try:
        with lock.held(settings.broker_url, lock.REAP), connect(settings) as cloud:
            verdicts = reaper.reap(cloud, settings, dry_run=dry_run)
    except LockBusyError:
        log.info("reap: another run holds the lock; skipped")
        return []
    return [{"server": v.server.name, "action": v.action.value, "reason": v.reason}
            for v in verdicts]


def run_provision(pool: str, count: int = 1, *, cpus: int = 1, memory_mb: int = 0,
                  scratch_mb: int = 0, image: str | None = None,
                  lifetime_s: int | None = None) -> list[str]:
    """Boot ``count`` nodes for ``pool`` under the provision lock; return their names."""
    settings = CloudSettings.from_env()
    order = Order(pool=pool, count=count, need=Need(cpus, memory_mb, scratch_mb), image=image,
                  lifetime_s=lifetime_s)
    with lock.held(settings.broker_url, lock.PROVISION), connect(settings) as cloud:
        return [s.name for s in provision(cloud, settings, order)]


def run_autoscale() -> list[dict[str, Any]]:
    """Start nodes where pools have waiting jobs, within quotas; return what was booted."""
    settings = CloudSettings.from_env()
    try:
        with lock.held(settings.broker_url, lock.PROVISION), connect(settings) as cloud:
            return scaler.autoscale(cloud, settings)
    except LockBusyError:
        log.info("autoscale: another run holds the provision lock; skipped")
        return []


def run_bootstrap(server_id: str) -> str:
    """Bootstrap one server booted for a multi-node job (the gang watcher asks); return
    its name, or '' when it is gone already."""
    settings = CloudSettings.from_env()
    with connect(settings) as cloud:
        server = cloud.server(server_id)
        if server is None:
            log.info("bootstrap: server %s is gone; nothing to do", server_id)
            return ""
        return bootstrap_server(cloud, settings, server).name


def _provision_task(self: Any, *args: Any, **kwargs: Any) -> list[str]:
    try:
        return run_provision(*args, **kwargs)
    except LockBusyError as exc:
        raise self.retry(exc=exc, countdown=5, max_retries=60) from None


def run_expire_leases() -> list[str]:
    """Send out again (or hold) every job whose lease expired; return their ids.

    The ledger service can do this itself (``dispatch ledger --lease-check-s``); run
    from beat, it survives a ledger restart and takes a lock so two beats act once.
    """
    settings = CloudSettings.from_env()
    if not settings.ledger_url:
        log.warning("expire-leases: DISPATCH_LEDGER_URL is not set; nothing to do")
        return []
    try:
        with lock.held(settings.broker_url, lock.LEASES):
            conn = broker.connect(settings.broker_url, heartbeat_s=0)
            ledger = Ledger.open(settings.ledger_url)
            try:
                publisher = AmqpPublisher(conn.default_channel, str(conn.userid))
                handled = expire_leases(ledger, publisher, utcnow())
            finally:
                ledger.close()
                conn.release()
    except LockBusyError:
        log.info("expire-leases: another run holds the lock; skipped")
        return []
    if handled:
        log.info("expire-leases: sent out again or held %d job(s): %s", len(handled),
                 " ".join(handled))
    return handled


reap = app.task(name=REAP_TASK)(run_reap)
expire_leases_task = app.task(name=LEASES_TASK)(run_expire_leases)
provision_task = app.task(name=PROVISION_TASK, bind=True)(_provision_task)
autoscale = app.task(name=AUTOSCALE_TASK)(run_autoscale)
bootstrap_task = app.task(name=BOOTSTRAP_TASK)(run_bootstrap)
