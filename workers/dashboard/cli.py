"""``dispatch flower-feed``: run the feed that shows Dispatch in Flower (an entry point).

Celery and the feed load only when the command runs, so other ``dispatch`` verbs stay quick.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from dispatch.config import DEFAULT_BROKER_URL


@click.command("flower-feed")
@click.option("--broker", envvar="DISPATCH_BROKER_URL", default=DEFAULT_BROKER_URL,
              show_envvar=True, help="AMQP URL of the broker Flower watches.")
def flower_feed(broker: str) -> None:
    """Show Dispatch jobs and execute nodes in Flower, as Celery tasks and workers.

    Reads the events nodes publish from the queue dispatch.dashboard (bound once the
    ledger's queue exists) and answers Flower's inspect requests for every live node.
    """
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from workers.dashboard.feed import Feed  # noqa: PLC0415 - celery loads only here

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Feed(broker).run(stop)
