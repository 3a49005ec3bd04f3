"""The Celery app of the cloud plane, with its beat schedule. Configured from the environment.

Run it as ``celery -A workers.cloud.app worker -E`` and ``celery -A workers.cloud.app beat``
(both read the ``DISPATCH_*`` variables of :mod:`workers.cloud.settings`). JSON only:
no pickle is accepted, sent or stored. Task events are on so Flower sees every task.
With ``DISPATCH_CLOUD_POOLS`` set (and ``DISPATCH_CLOUD_GANGS`` not 0), each worker also
runs the gang watcher (:mod:`workers.cloud.watcher`) in a thread: it boots and deletes
the servers of multi-node jobs, and hands their SSH bootstrap to the bootstrap task.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

from workers.cloud.settings import CloudSettings

REAP_TASK = "dispatch.cloud.reap"
PROVISION_TASK = "dispatch.cloud.provision"
AUTOSCALE_TASK = "dispatch.cloud.autoscale"
LEASES_TASK = "dispatch.ledger.expire_leases"
BOOTSTRAP_TASK = "dispatch.cloud.bootstrap"
log = logging.getLogger(__name__)


def beat_schedule(settings: CloudSettings) -> dict[str, dict[str, Any]]:
    """Return the periodic runs: reap always, autoscale when its interval is set, and
    the ledger's lease expiry when a ledger database is configured.

    A run that waited longer than its interval expires unrun, so a stopped worker
    does not face a pile of stale runs when it comes back.
    """
    schedule: dict[str, dict[str, Any]] = {
        "reap": {"task": REAP_TASK, "schedule": float(settings.reap_every_s),
                 "options": {"expires": float(settings.reap_every_s)}},
    }
    if settings.autoscale_every_s:
        schedule["autoscale"] = {"task": AUTOSCALE_TASK,
                                 "schedule": float(settings.autoscale_every_s),
                                 "options": {"expires": float(settings.autoscale_every_s)}}
    if settings.ledger_url and settings.lease_check_every_s:
        schedule["expire-leases"] = {"task": LEASES_TASK,
                                     "schedule": float(settings.lease_check_every_s),
                                     "options": {"expires": float(settings.lease_check_every_s)}}
    return schedule


def make_app(settings: CloudSettings | None = None) -> Celery:
    """Return a Celery app for ``settings`` (read from the environment by default)."""
    settings = settings or CloudSettings.from_env()
    app = Celery("dispatch-cloud", broker=settings.broker_url, include=["workers.cloud.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=settings.task_queue,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_heartbeat=settings.broker_heartbeat_s,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    app.steps["worker"].add(GangWatchStep)
    return app


class GangWatchStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the gang watcher in a thread of the worker while it runs (pools set only)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        """Start the watcher when the settings ask for it."""
        from workers.cloud.watcher import GangWatcher  # noqa: PLC0415 - kombu, openstacksdk

        settings = CloudSettings.from_env()
        if not settings.gangs or not settings.pools:
            return
        celery = parent.app

        def bootstrap(server: Any) -> None:
            celery.send_task(BOOTSTRAP_TASK, args=[server.id])

        watcher = GangWatcher(settings, bootstrap=bootstrap)
        self._thread = threading.Thread(target=watcher.run, args=(self._stop,),
                                        name="gang-watcher", daemon=True)
        self._thread.start()
        log.info("gang watcher started for pools %s", ", ".join(settings.pools))

    def stop(self, parent: Any) -> None:
        """Stop the watcher (it finishes the event in hand)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


app = make_app()
