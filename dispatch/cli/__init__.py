"""The ``dispatch`` command: qsub/qstat-style verbs over the AMQP fast path.

Subcommands live in their own modules; packages may add more through the
``dispatch.commands`` entry-point group (that is how ``dispatch worker`` arrives
from ``workers/`` without ``dispatch/`` importing it).
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import click

from dispatch.cli import chirp, control, demo, ledger, listen, queries, submit, users
from dispatch.errors import DispatchError, InvalidJobError

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_DISPATCH = 125


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Dispatch: low-latency jobs over AMQP."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(submit.submit_command)
cli.add_command(submit.wait_command)
cli.add_command(listen.listen_command)
cli.add_command(demo.demo_command)
cli.add_command(ledger.ledger_command)
cli.add_command(queries.q_command)
cli.add_command(queries.q_command, "ls")
cli.add_command(queries.history_command)
cli.add_command(queries.stat_command)
cli.add_command(queries.explain_command)
cli.add_command(control.rm_command)
cli.add_command(control.hold_command)
cli.add_command(control.release_command)
cli.add_command(users.users_command)
cli.add_command(chirp.chirp_command)
for _entry in entry_points(group="dispatch.commands"):
    cli.add_command(_entry.load(), _entry.name)


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
