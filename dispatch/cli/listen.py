"""``dispatch listen``: the result-listener, one line per status update."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from dispatch.config import Settings
from dispatch.job import JobUpdate
from dispatch.result import JobResult

from . import output
from .submit import broker_option, client_for


@click.command("listen")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where results are unpacked (default ./dispatch-results).")
@click.option("--client-id", help="Reply queue to listen on (default: this user's).")
@click.option("--until-idle", is_flag=True, help="Exit once no reply has come for --idle-s.")
@click.option("--idle-s", type=float, default=2.0, show_default=True,
              help="Quiet time that counts as idle.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per update.")
@broker_option
def listen_command(out_dir: Path | None, client_id: str | None, until_idle: bool,
                   idle_s: float, as_json: bool, broker: str | None) -> None:
    """Print every reply on this client's queue; save and unpack final results."""
    out_dir = out_dir or Settings.from_env().results_dir
    with client_for(broker, client_id) as client:
        if not as_json:
            click.echo(f"listening on {client.reply_queue}; results go to {out_dir}", err=True)
        last = time.monotonic()
        saved: dict[str, str] = {}

        def keep(update: JobUpdate) -> None:  # runs before the reply is acked
            if update.is_final:
                saved[update.job_id] = str(output.save(JobResult(update), out_dir))

        while True:
            update = client.next_update(None, idle_s if until_idle else 1.0, before_ack=keep)
            if update is None:
                if until_idle and time.monotonic() - last >= idle_s:
                    return
                continue
            last = time.monotonic()
            record = output.update_record(update)
            line = output.describe(update)
            if update.job_id in saved and update.archive:
                record["directory"] = saved.pop(update.job_id)
                line += f" -> {record['directory']}"
            click.echo(json.dumps(record) if as_json else line)
