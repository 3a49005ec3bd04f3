"""The ``dispatch`` command: qsub/qstat-style verbs over the AMQP fast path.

Subcommands live in their own modules; packages may add more through the
``dispatch.commands`` entry-point group (that is how ``dispatch worker`` arrives
from ``workers/`` without ``dispatch/`` importing it). A verb's module is imported
only when that verb runs: ``dispatch submit`` does not load the ledger's SQLAlchemy,
nor a worker the cloud plane's openstacksdk.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import EntryPoint, entry_points

import click

from dispatch.errors import DispatchError, InvalidJobError

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_DISPATCH = 125


#: Verb -> "module:attribute" of its click command.
VERBS = {
    "submit": "dispatch.cli.submit:submit_command",
    "wait": "dispatch.cli.submit:wait_command",
    "listen": "dispatch.cli.listen:listen_command",
    "demo": "dispatch.cli.demo:demo_command",
    "ledger": "dispatch.cli.ledger:ledger_command",
    "q": "dispatch.cli.queries:q_command",
    "ls": "dispatch.cli.queries:q_command",
    "history": "dispatch.cli.queries:history_command",
    "stat": "dispatch.cli.queries:stat_command",
    "explain": "dispatch.cli.queries:explain_command",
    "rm": "dispatch.cli.control:rm_command",
    "hold": "dispatch.cli.control:hold_command",
    "release": "dispatch.cli.control:release_command",
    "users": "dispatch.cli.users:users_command",
    "chirp": "dispatch.cli.chirp:chirp_command",
    "shutdown": "dispatch.cli.shutdown:shutdown_command",
    # openstack-queue's (and PBS's) names for the same verbs
    "qsub": "dispatch.cli.submit:submit_command",
    "qstat": "dispatch.cli.queries:q_command",
    "qdel": "dispatch.cli.control:rm_command",
}


class LazyGroup(click.Group):
    """A group whose verbs are imported when used (``--help`` imports them all)."""

    def _plugins(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group="dispatch.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Return every verb's name, without importing any."""
        return sorted({*super().list_commands(ctx), *VERBS, *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the verb's module (or load its plug-in) and return its command."""
        if cmd_name in VERBS:
            module, _, attribute = VERBS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
        elif (plugin := self._plugins().get(cmd_name)) is not None:
            command = plugin.load()
        else:
            return super().get_command(ctx, cmd_name)
        if not isinstance(command, click.Command):
            raise TypeError(f"dispatch {cmd_name}: {command!r} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Dispatch: low-latency jobs over AMQP."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; Dispatch errors become one line on stderr and exit status 125."""
    try:
        status = cli.main(args=argv, prog_name="dispatch", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except InvalidJobError as exc:
        click.echo(f"dispatch: error: {exc.reason}", err=True)
        return EXIT_USAGE
    except DispatchError as exc:
        click.echo(f"dispatch: error: {_reason(exc)}", err=True)
        return EXIT_DISPATCH
    return status if isinstance(status, int) else 0


def _reason(exc: DispatchError) -> str:
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
