"""Parse a ``dispatch ...`` command line with the real click group, without running it.

Used by tests/test_compose.py and tests/test_docs.py: an unknown verb or option, a missing
argument or a bad value raises :class:`click.UsageError`, exactly as the command would.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from dispatch.cli import cli


@dataclass(frozen=True)
class Parsed:
    """A parsed command line: the verb path and the options given, by canonical spelling."""

    verbs: tuple[str, ...]
    options: frozenset[str]
    params: dict[str, object]


def parse(argv: list[str]) -> Parsed:
    """Parse ``argv`` (without the leading ``dispatch``); raise click.UsageError if it is wrong."""
    ctx = cli.make_context("dispatch", list(argv))
    command: click.Command = cli
    verbs: list[str] = []
    options = _given(cli, ctx)
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            raise click.UsageError("no verb given", ctx=ctx)
        name, sub, args = command.resolve_command(ctx, rest)
        if sub is None or name is None:
            raise click.UsageError(f"no such command {rest[0]!r}", ctx=ctx)
        verbs.append(name)
        ctx = sub.make_context(name, args, parent=ctx)
        command = sub
        options |= _given(sub, ctx)
    return Parsed(tuple(verbs), frozenset(options), dict(ctx.params))


def spellings(verbs: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Return, for each option of the command at ``verbs``, all its spellings (-c, --cmd)."""
    command: click.Command = cli
    for verb in verbs:
        assert isinstance(command, click.Group)
        found = command.get_command(click.Context(command), verb)
        assert found is not None, verb
        command = found
    return {p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0]: (*p.opts, *p.secondary_opts)
            for p in command.params if isinstance(p, click.Option)}


def _given(command: click.Command, ctx: click.Context) -> set[str]:
    """Return the canonical spellings of the options given on the command line."""
    given = set()
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is click.core.ParameterSource.COMMANDLINE:
            longest = [o for o in param.opts if o.startswith("--")]
            given.add(longest[-1] if longest else param.opts[0])
    return given
