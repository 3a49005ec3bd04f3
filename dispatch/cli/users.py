"""``dispatch users add NAME``: a RabbitMQ user that may submit jobs and read only its own replies.

Permissions given (``rabbitmqctl set_permissions``; regular expressions on names):

==========  ===========================================  =======================================
configure   ``^(dispatch\\.reply\\.NAME-.*|dispatch\\.jobs)$``  declare its reply queues (and the
                                                          jobs exchange, which clients declare)
write       ``^(dispatch\\.jobs|amq\\.default)$``          publish jobs; send control requests
                                                          to ``dispatch.ledger.control``
read        ``^dispatch\\.reply\\.NAME-.*$``                 consume its own reply queues only
==========  ===========================================  =======================================

So the user's client ids must start with ``NAME-`` (``DISPATCH_CLIENT_ID=NAME-laptop``).
Writing to ``amq.default`` lets a user publish to any queue by name: control requests
are safe (the ledger trusts only the broker-validated ``user_id``), but such a user
could drop a message into another user's reply queue. ``--admin`` tags the user
``dispatch-admin``; add it to the ledger's ``DISPATCH_ADMINS`` too.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys

import click

from dispatch.errors import BrokerError, InvalidJobError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
ADMIN_TAG = "dispatch-admin"


def permissions(name: str) -> tuple[str, str, str]:
    """Return the (configure, write, read) patterns of user ``name``."""
    own = rf"dispatch\.reply\.{re.escape(name)}-.*"
    return (rf"^({own}|dispatch\.jobs)$", r"^(dispatch\.jobs|amq\.default)$", rf"^{own}$")


def _ctl(ctl: str, node: str | None, *args: str, stdin: str | None = None) -> None:
    cmd = [ctl, *(("-n", node) if node else ()), *args]
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"cannot run {ctl}: {exc}") from exc
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise BrokerError(f"rabbitmqctl {args[0]} failed: {detail}")


@click.group("users")
def users_command() -> None:
    """Manage the broker users of Dispatch."""


@users_command.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin "
              "(else one is generated and printed once).")
@click.option("--admin", is_flag=True, help=f"Tag the user {ADMIN_TAG} (may rm/hold/release "
              "any job once listed in DISPATCH_ADMINS).")
@click.option("-p", "--vhost", default="/", show_default=True, help="Virtual host.")
@click.option("-n", "--node", help="RabbitMQ node name (rabbitmqctl -n).")
@click.option("--rabbitmqctl", "ctl", default="rabbitmqctl", show_default=True,
              help="rabbitmqctl to run.")
def add_command(name: str, password_stdin: bool, admin: bool, vhost: str, node: str | None,
                ctl: str) -> None:
    """Create broker user NAME allowed to submit jobs and read its own replies."""
    if not _NAME.match(name):
        raise InvalidJobError("use 1-64 letters, digits and _ . : - (it prefixes client ids)",
                              field="NAME")
    generated = not password_stdin
    password = secrets.token_urlsafe(18) if generated else sys.stdin.readline().rstrip("\n")
    if not password:
        raise InvalidJobError("is empty", field="password")
    _ctl(ctl, node, "add_user", name, stdin=password + "\n")
    _ctl(ctl, node, "set_permissions", "-p", vhost, name, *permissions(name))
    if admin:
        _ctl(ctl, node, "set_user_tags", name, ADMIN_TAG)
    click.echo(f"user {name} added to vhost {vhost}; client ids must start with {name}-",
               err=True)
    if generated:
        click.echo(password)
