"""Every ``dispatch ...`` command shown in docs/*.md is real and exercised by a test.

Each command line in the shell (and ``$``-prompted text) blocks of the docs is parsed by
the real click group: an unknown verb or option, or a missing argument, fails here. Then a
test under tests/ must run that verb with those options: some test function whose string
literals (its own, and those of the helpers, fixtures and classes it uses, found through
their names) hold ``dispatch``, the verbs and one spelling of every option. Commands that
no other test runs are run for real at the end of this module, against the test broker.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import click
import kombu
import pytest
from cli_parse import Parsed, parse, spellings
from ledger_events import job

from dispatch.events import Event
from dispatch.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHELL_BLOCKS = {"sh", "bash", "shell", "console", ""}
PUNCTUATION = set("();<>|&")
#: Shown in the docs, checked by the parser, but run by no test, and why. None at present.
EXCEPTIONS: dict[str, str] = {}


@dataclass(frozen=True)
class DocCommand:
    """One ``dispatch`` command line shown in a doc."""

    doc: str
    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


# -- finding the commands ---------------------------------------------------------------

def _blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """Return the fenced code blocks of a markdown text as (first line, language, lines)."""
    blocks, current, lang, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and current is None:
            current, lang, start = [], fence.group(1), number + 1
        elif fence:
            blocks.append((start, lang, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _logical_lines(lang: str, lines: list[str]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, line in enumerate(lines):
        if lang not in SHELL_BLOCKS:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def _segments(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= PUNCTUATION:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _dispatch_argv(words: list[str]) -> list[str] | None:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return None
    if words[0] == "dispatch":
        return words[1:]
    if words[0] in ("docker", "sudo", "exec", "env") and "dispatch" in words:
        return words[words.index("dispatch") + 1:]
    return None


def doc_commands() -> list[DocCommand]:
    """Return every dispatch command line in the code blocks of docs/*.md."""
    found = []
    for doc in DOCS:
        for start, lang, lines in _blocks(doc.read_text(encoding="utf-8")):
            if lang not in SHELL_BLOCKS | {"text"}:
                continue
            for offset, line in _logical_lines(lang, lines):
                for words in _segments(line):
                    argv = _dispatch_argv(words)
                    if argv is not None:
                        found.append(DocCommand(doc.name, start + offset, tuple(argv)))
    return found


COMMANDS = doc_commands()


def _parsed(command: DocCommand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Parsed:
    """Parse in a scratch directory holding the files the command names (--input must exist)."""
    monkeypatch.chdir(tmp_path)
    for word in command.argv:
        if re.fullmatch(r"[\w.-]+\.(py|csv|sh|txt|yaml|yml|json)", word):
            (tmp_path / word).touch()
    return parse(list(command.argv))


# -- what the tests run -----------------------------------------------------------------

def _tokens(node: ast.AST) -> set[str]:
    """The string literals under ``node`` (assertions aside), also split into shell words."""
    out: set[str] = set()
    asserted = {id(n) for a in ast.walk(node) if isinstance(a, ast.Assert) for n in ast.walk(a)}
    for const in ast.walk(node):
        if id(const) in asserted:
            continue
        if isinstance(const, ast.Constant) and isinstance(const.value, str):
            text = const.value
            out.add(text)
            try:
                words = shlex.split(text)
            except ValueError:
                words = text.split()
            out.update(words)
            out.update(w.split("=", 1)[0] for w in words if w.startswith("--") and "=" in w)
    return out


def _names(node: ast.AST) -> set[str]:
    found = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if isinstance(node, ast.FunctionDef):
        found |= {a.arg for a in node.args.args + node.args.kwonlyargs}  # fixtures
    return found


@functools.cache
def _definitions() -> dict[str, list[ast.AST]]:
    """Every top-level function and class of tests/*.py, by name."""
    defs: dict[str, list[ast.AST]] = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("test_docs.py", "cli_parse.py"):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defs.setdefault(node.name, []).append(node)
    return defs


@functools.cache
def _reach(name: str) -> frozenset[str]:
    """The tokens of definition ``name`` and of every definition it names, transitively."""
    seen, todo, tokens = {name}, [name], set()
    while todo:
        for node in _definitions().get(todo.pop(), []):
            tokens |= _tokens(node)
            for other in _names(node) - seen:
                if other in _definitions():
                    seen.add(other)
                    todo.append(other)
    return frozenset(tokens)


@functools.cache
def _test_functions() -> tuple[tuple[str, frozenset[str]], ...]:
    """Every test function with the tokens it reaches (this module's checks left out)."""
    tests = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            if path.name == "test_docs.py" and node.name in CHECKS:
                continue
            tokens = set(_tokens(node))
            for name in _names(node) & set(_definitions()):
                tokens |= _reach(name)
            tests.append((f"{path.name}::{node.name}", frozenset(tokens)))
    return tuple(tests)


def _runners(parsed: Parsed) -> list[str]:
    """Tests elsewhere that run the verbs of ``parsed`` with all its options."""
    options = spellings(parsed.verbs)
    wanted = [set(options.get(o, (o,))) for o in parsed.options if o not in ("--verbose",)]
    return [name for name, tokens in _test_functions()
            if "dispatch" in tokens and set(parsed.verbs) <= tokens
            and all(spelling & tokens for spelling in wanted)]


# -- the checks -------------------------------------------------------------------------

#: This module's own checks: they name commands without running them.
CHECKS = frozenset({
    "test_the_docs_show_commands_of_every_verb_users_and_operators_type",
    "test_every_command_in_the_docs_parses_with_the_real_cli",
    "test_every_command_in_the_docs_is_run_by_a_test_with_its_options",
    "test_a_wrong_command_would_fail_the_parse_check",
    "test_the_coverage_check_finds_no_runner_for_an_option_no_test_uses",
    "test_the_exceptions_name_commands_the_docs_still_show",
    "test_relative_links_between_the_docs_resolve",
    "test_the_docs_index_links_every_page",
})

def test_the_docs_show_commands_of_every_verb_users_and_operators_type():
    verbs = {c.argv[0] for c in COMMANDS if c.argv and not c.argv[0].startswith("-")}
    assert {"submit", "wait", "listen", "q", "ls", "history", "stat", "explain", "rm", "hold",
            "release", "users", "chirp", "ledger", "worker", "cloud", "demo",
            "flower-feed"} <= verbs


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_in_the_docs_parses_with_the_real_cli(command, tmp_path, monkeypatch):
    try:
        _parsed(command, tmp_path, monkeypatch)
    except click.UsageError as exc:
        pytest.fail(f"{command}: {exc.format_message()}")


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_in_the_docs_is_run_by_a_test_with_its_options(command, tmp_path,
                                                                     monkeypatch):
    parsed = _parsed(command, tmp_path, monkeypatch)
    key = shlex.join(("dispatch", *command.argv))
    if key in EXCEPTIONS:
        pytest.skip(f"listed exception: {EXCEPTIONS[key]}")
    assert _runners(parsed), f"no test runs {' '.join(parsed.verbs)} with " \
                             f"{sorted(parsed.options)}"


@pytest.mark.parametrize("argv", [
    ["submit", "--wiat", "--", "true"],
    ["sumbit", "--", "true"],
    ["wait"],
    ["users", "add", "alice", "--admn"],
])
def test_a_wrong_command_would_fail_the_parse_check(argv):
    with pytest.raises(click.UsageError):
        parse(argv)


def test_the_coverage_check_finds_no_runner_for_an_option_no_test_uses():
    assert not _runners(Parsed(("submit",), frozenset({"--no-such-option"}), {}))
    assert _runners(parse(["submit", "--wait", "--", "echo", "hi"]))


def test_the_exceptions_name_commands_the_docs_still_show():
    shown = {shlex.join(("dispatch", *c.argv)) for c in COMMANDS}
    assert set(EXCEPTIONS) <= shown
    names = {n.name for n in ast.parse(Path(__file__).read_text(encoding="utf-8")).body
             if isinstance(n, ast.FunctionDef)}
    assert names >= CHECKS


def test_relative_links_between_the_docs_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"


# -- the commands no other test runs, run here for real ---------------------------------

def test_a_worker_with_slots_memory_groups_and_a_name_gets_the_jobs_that_need_them(
        workers, pool, dispatch_cli):
    name = f"node-7-{pool}.example.org"
    workers.start("--memory", "2G", "--group", "ssd", "--name", name, pools=(pool,), slots=2)
    run = dispatch_cli("submit", "--pool", pool, "-r", "group: ssd; memory: 1G", "--wait",
                       "--json", "--", "true")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["host"] == name
    refused = dispatch_cli("submit", "--pool", pool, "-r", "memory: 3G", "--wait", "--", "true")
    assert refused.returncode == 125 and "RequestMemory" in refused.stderr


def test_a_job_with_inputs_environment_priority_and_requirements_runs_with_all_of_them(
        worker, pool, dispatch_cli, tmp_path):
    (tmp_path / "analyse.py").write_text(
        "import os, sys\n"
        "rows = open(sys.argv[1]).read().split()\n"
        "print(os.environ['MODE'], len(rows), sum(map(int, rows)))\n")
    (tmp_path / "data.csv").write_text("1\n2\n3\n")
    run = dispatch_cli("submit", "--input", "analyse.py", "--input", "data.csv", "-e",
                       "MODE=fast", "--priority", "high", "-r",
                       "cpus: 1; memory: 64M; time_limit: 10m", "--pool", pool, "--wait",
                       "--json", "--", "python3", "analyse.py", "data.csv")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    out = tmp_path / "dispatch-results" / record["job_id"] / "job.out"
    assert out.read_text() == "fast 3 6\n"


def test_an_array_given_on_the_command_line_runs_every_index_and_sums_up(worker, pool,
                                                                         dispatch_cli, tmp_path):
    run = dispatch_cli("submit", "--array", "3", "--pool", pool, "--wait", "-c",
                       "echo part $DISPATCH_ARRAY_INDEX of $DISPATCH_ARRAY_SIZE")
    assert run.returncode == 0, run.stderr
    assert "3 jobs: 3 exit 0" in run.stderr
    outs = sorted(p.read_text() for p in (tmp_path / "dispatch-results").glob("*/job.out"))
    assert outs == ["part 0 of 3\n", "part 1 of 3\n", "part 2 of 3\n"]


def test_listen_on_a_named_client_id_prints_json_for_that_queue_only(worker, pool,
                                                                      dispatch_cli):
    client_id = f"alice-{uuid.uuid4().hex[:8]}"
    job_id = dispatch_cli("submit", "--client-id", client_id, "--pool", pool, "--",
                          "true").stdout.strip()
    other = dispatch_cli("submit", "--pool", pool, "--", "true").stdout.strip()
    run = dispatch_cli("listen", "--client-id", client_id, "--json", "--until-idle",
                       "--idle-s", "3")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    # /bin/true ends within the node's --running-after: its one reply is the final one.
    assert [r["state"] for r in records if r["job_id"] == job_id] == ["Exited"]
    assert all(r["job_id"] != other for r in records)


def test_q_full_json_lists_finished_jobs_with_full_ids(dispatch_cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    led = Ledger.open(db)
    long_id = "job-" + "7" * 40
    for body in (job(Event.CLAIMED, long_id), job(Event.RUNNING, long_id),
                 job(Event.EXITED, long_id, t=2, exit_code=3)):
        led.apply(body)
    led.close()
    assert long_id not in dispatch_cli("q", "--db", db).stdout
    run = dispatch_cli("q", "--full", "--json", "--db", db)
    assert run.returncode == 0, run.stderr
    assert [(j["job_id"], j["state"], j["exit_code"]) for j in json.loads(run.stdout)] == [
        (long_id, "Exited", 3)]


def test_users_add_through_the_compose_wrapper_makes_a_user_that_can_submit(
        rabbitmq_proc, vhost, tmp_path):
    # No Docker here: a stand-in for `docker compose` checks what the wrapper asks of it
    # and runs the real rabbitmqctl of the test broker with the rest.
    ctl = rabbitmq_proc.rabbit_ctl
    shim = tmp_path / "compose"
    shim.write_text("#!/bin/sh\n"
                    '[ "$1 $2 $3 $4" = "exec -T rabbitmq rabbitmqctl" ] || exit 99\n'
                    f'shift 4; exec {ctl} "$@"\n')
    shim.chmod(0o755)
    name = f"alice{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **rabbitmq_proc._popen_kwargs["env"], "DISPATCH_COMPOSE": str(shim)}
    done = subprocess.run([sys.executable, "-m", "dispatch", "users", "add", name, "-p", vhost,
                           "--rabbitmqctl", "deploy/rabbitmqctl", "--password-stdin"],
                          input="s3cret-pw\n", capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env, check=False)
    try:
        assert done.returncode == 0, done.stderr
        url = f"amqp://{name}:s3cret-pw@{rabbitmq_proc.host}:{rabbitmq_proc.port}/{vhost}"
        with kombu.Connection(url, heartbeat=0) as conn:
            conn.default_channel.queue_declare(f"dispatch.reply.{name}-laptop", durable=True)
    finally:
        rabbitmq_proc.rabbitctl_output("delete_user", name)


def test_the_docs_index_links_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for doc in DOCS:
        if doc.name != "README.md":
            assert f"]({doc.name})" in index, f"docs/README.md does not link {doc.name}"
