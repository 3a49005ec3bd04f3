"""``dispatch chirp``: inside a running job, publish an attribute (service as a job)."""

from __future__ import annotations

import click

from dispatch import chirp


@click.group("chirp")
def chirp_command() -> None:
    """Talk to the worker running this job (like condor_chirp)."""


@chirp_command.command("set")
@click.argument("name")
@click.argument("value")
def set_command(name: str, value: str) -> None:
    """Set job attribute NAME to VALUE; the client and the ledger see it."""
    chirp.send(name, value)
