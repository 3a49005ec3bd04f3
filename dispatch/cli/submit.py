"""``dispatch submit`` and ``dispatch wait``: qsub and qwait for the fast path."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from dispatch.client import Client, JobHandle
from dispatch.config import Settings
from dispatch.errors import InvalidJobFileError, JobTimeoutError, ResultNotSavedError
from dispatch.job import JobSpec, JobState, JobUpdate
from dispatch.jobfile import load, parse_priority, parse_requirement_string, spec_from_fields
from dispatch.progress import Progress
from dispatch.result import JobResult

from . import arrays, destinations, output

EXIT_TIMEOUT = 124
JOBFILE_SUFFIXES = (".yaml", ".yml", ".json")


def broker_option(f: Any) -> Any:
    """Add ``--broker`` (default: DISPATCH_BROKER_URL) to a command."""
    return click.option("--broker", envvar="DISPATCH_BROKER_URL", show_envvar=True,
                        help="AMQP URL of the broker.")(f)


def client_for(broker: str | None, client_id: str | None) -> Client:
    """Return a client with this user's stable client id (or ``client_id``)."""
    settings = Settings.from_env()
    settings = replace(settings, client_id=client_id or settings.client_id)
    return Client(broker or settings.broker_url, client_id=settings.stable_client_id())


@click.command("submit")
@click.argument("first", metavar="[JOBFILE]", required=False, type=click.Path(dir_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "--cmd", "shell_cmd", metavar="CMD", help="Run CMD with /bin/sh -c.")
@click.option("-r", "--requirements", "reqs", metavar="REQS",
              help='Override requirements, e.g. "cpus: 2; memory: 4G; time_limit: 1h".')
@click.option("--pool", envvar="DISPATCH_POOL", help="Pool to submit to (default: default).")
@click.option("--no-fallback", "no_fallback", is_flag=True,
              help="Wait for a node of this pool; never reroute to a fallback pool.")
@click.option("--priority", metavar="low|med|high|0-9", help="Job priority.")
@click.option("--input", "inputs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="File or directory to ship with the job (repeatable).")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable for the job (repeatable).")
@click.option("--name", help="A name for listings.")
@click.option("--source", metavar="URL|DIR",
              help="A git URL the node fetches, or a directory shipped as the job's files.")
@click.option("--ref", metavar="REF", help="Branch, tag or commit of a git --source.")
@click.option("--setup", "setup", multiple=True, metavar="CMD",
              help="Shell line run before the command (repeatable, in order).")
@click.option("--output", "output", multiple=True, metavar="GLOB",
              help="Only these files come back, besides stdout and stderr (repeatable).")
@click.option("--array", "array", type=click.IntRange(1, 100_000), metavar="N",
              help="Submit N copies sharing an array id (index in DISPATCH_ARRAY_INDEX).")
@click.option("--wait", "wait_", is_flag=True, help="Wait, show progress, unpack the result.")
@click.option("--timeout", "timeout_s", type=float, help="With --wait: give up after SECONDS.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where results are unpacked (default ./dispatch-results).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--client-id", help="Reply queue to use (default: this user's).")
@broker_option
@click.pass_context
def submit_command(ctx: click.Context, /, first: str | None, command: tuple[str, ...],
                   **opts: Any) -> None:
    """Submit a job from JOBFILE, -c CMD, or -- CMD ARGS...; print its id."""
    jobfile = Path(first) if first is not None else None
    if first is not None and (command or Path(first).suffix not in JOBFILE_SUFFIXES):
        command, jobfile = (first, *command), None  # `submit -- CMD ARGS...`, ./x kept as typed
    fields = _fields(jobfile, command, opts)
    base = jobfile.parent if jobfile else Path()
    spec = spec_from_fields(fields, base)
    count = opts["array"] or fields.get("array")
    if count:
        ctx.exit(_submit_array(spec, int(count), opts))
    with client_for(opts["broker"], opts["client_id"]) as client:
        handle = client.submit(spec)
        destinations.remember(Settings.from_env().config_dir, handle.job_id,
                              destinations.wanted(fields, base))  # log_path, results_path
        if not opts["as_json"]:
            click.echo(handle.job_id)
        if not opts["wait_"]:
            if opts["as_json"]:
                click.echo(json.dumps({"job_id": handle.job_id}))
            return
        out_dir = opts["out_dir"] or Settings.from_env().results_dir
        code = follow(handle, out_dir, opts["timeout_s"], opts["as_json"])
    ctx.exit(code)


def _submit_array(spec: JobSpec, count: int, opts: dict[str, Any]) -> int:
    settings = Settings.from_env()
    with client_for(opts["broker"], opts["client_id"]) as client:
        handles = client.submit_array(spec, count)
        array_id = handles[0].job_id.rpartition(".")[0]
        arrays.remember(settings.config_dir, array_id, [h.job_id for h in handles])
        if opts["as_json"] and not opts["wait_"]:
            click.echo(json.dumps({"array_id": array_id, "job_ids": [h.job_id for h in handles]}))
            return 0
        if not opts["as_json"]:
            click.echo(array_id)
        if not opts["wait_"]:
            return 0
        out_dir = opts["out_dir"] or settings.results_dir
        statuses = _wait_all(client, [h.job_id for h in handles], out_dir, opts["timeout_s"],
                             opts["as_json"], force_bar=True)
    if not opts["as_json"]:
        click.echo(arrays.summary(statuses), err=True)
    return 0 if all(code == 0 for code in statuses.values()) else 1


def _fields(jobfile: Path | None, command: tuple[str, ...], opts: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = load(jobfile) if jobfile else {}
    if opts["shell_cmd"] or command:
        fields.pop("execution", None)
        fields.pop("execute", None)
        fields["command"] = ["/bin/sh", "-c", opts["shell_cmd"]] if opts["shell_cmd"] else list(
            command)
    if not {"command", "execution", "execute"} & fields.keys():
        raise InvalidJobFileError("no command: give a JOBFILE, -c CMD or -- CMD ARGS",
                                  field="command")
    _staging(fields, opts)
    if opts["reqs"]:
        fields["requirements"] = {**(fields.get("requirements") or {}),
                                  **parse_requirement_string(opts["reqs"])}
    if opts["pool"]:
        fields["pool"] = opts["pool"]
    if opts["no_fallback"]:
        fields["fallback"] = False
    if opts["priority"] is not None:
        fields["priority"] = parse_priority(opts["priority"])
    if opts["inputs"]:
        fields["inputs"] = [*(fields.get("inputs") or []), *map(str, opts["inputs"])]
    if opts["env"]:
        fields["environment"] = {**(fields.get("environment") or {}), **_env(opts["env"])}
    if opts["name"]:
        fields["name"] = opts["name"]
    return fields


def _staging(fields: dict[str, Any], opts: dict[str, Any]) -> None:
    """Apply --source, --ref, --setup and --output over the job file's fields."""
    for name in ("source", "ref"):
        if opts[name]:
            fields[name] = opts[name]
    for name in ("setup", "output"):
        if opts[name]:
            fields[name] = [*_listed(fields.get(name)), *opts[name]]


def _listed(value: str | list[str] | None) -> list[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def _env(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidJobFileError(f"{pair!r} is not NAME=VALUE", field="environment")
        out[name] = value
    return out


class _Saver:
    """Saves each final result before its reply is acked, so a killed CLI loses none."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.saved: dict[str, Path] = {}

    def __call__(self, update: JobUpdate) -> None:
        if update.is_final and update.state is not JobState.REJECTED:
            self.saved[update.job_id] = output.save(JobResult(update), self.out_dir)

    def take(self, client: Client, job_ids: Iterable[str],
             timeout_s: float | None) -> JobUpdate | None:
        """Return the next reply for ``job_ids``, its result saved first if it is final.

        A result that cannot be saved leaves its reply queued for the next ``wait``.
        """
        try:
            return client.next_update(job_ids, timeout_s, before_ack=self)
        except OSError as exc:
            raise self.not_saved(exc) from exc

    def not_saved(self, exc: OSError) -> ResultNotSavedError:
        """Return the error a result that could not be saved is reported with."""
        return ResultNotSavedError(
            f"cannot save a result in {self.out_dir}: {exc.strerror or exc}; it stays "
            "on the reply queue for the next 'dispatch wait'")


def follow(handle: JobHandle, out_dir: Path, timeout_s: float | None, as_json: bool) -> int:
    """Show a job's progress until its final reply, save the result, return its exit status."""
    progress = Progress(enabled=not as_json)
    progress.status(f"{handle.job_id}: submitted, waiting for a node")
    saver = _Saver(out_dir)
    try:
        for update in handle.updates(timeout_s, before_ack=saver):
            if update.state is JobState.RUNNING:
                progress.status(f"{handle.job_id}: running on {update.host}")
            elif update.state is JobState.HELD:
                progress.status(f"{handle.job_id}: held: {update.reason}")
            elif update.state is JobState.IDLE:
                progress.status(f"{handle.job_id}: queued again, attempt {update.attempt}: "
                                f"{update.reason}")
    except JobTimeoutError as exc:
        progress.close()
        click.echo(f"dispatch: {exc}", err=True)
        return EXIT_TIMEOUT
    except OSError as exc:
        progress.close()
        raise saver.not_saved(exc) from exc
    progress.close()
    if handle.last is None:  # pragma: no cover - updates() ends only on a final reply
        return EXIT_TIMEOUT
    return report(JobResult(handle.last), out_dir, as_json, saver.saved.get(handle.job_id))


def report(result: JobResult, out_dir: Path, as_json: bool, dest: Path | None = None) -> int:
    """Save a final result (unless saved in ``dest``), print it, return its exit status."""
    record = output.update_record(result.update)
    if result.state is JobState.REJECTED:
        if as_json:
            click.echo(json.dumps(record))
        else:
            click.echo(f"dispatch: job {result.job_id} rejected: {result.reason}", err=True)
        return 125
    dest = dest or output.save(result, out_dir)
    record["directory"] = str(dest)
    record.update(_deliver(result.job_id, dest, as_json))
    if as_json:
        click.echo(json.dumps(record))
    else:
        click.echo(f"{output.describe(result.update)} -> {dest}", err=True)
    return output.shell_status(record)


def _deliver(job_id: str, dest: Path, as_json: bool) -> dict[str, Any]:
    """Copy a multi-node job's per-node logs and archives to its log_path/results_path."""
    try:
        copied = destinations.deliver(Settings.from_env().config_dir, job_id, dest)
    except OSError as exc:
        click.echo(f"dispatch: job {job_id}: per-node files are only in {dest}: {exc}",
                   err=True)
        return {}
    for target, names in copied.items() if not as_json else ():
        click.echo(f"{job_id}: {len(names)} file(s) copied to {target}", err=True)
    return {"copied": copied} if copied else {}


@click.command("wait")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--timeout", "timeout_s", type=float, help="Give up after SECONDS.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where results are unpacked (default ./dispatch-results).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per job.")
@click.option("--client-id", help="Reply queue the jobs were submitted with.")
@broker_option
@click.pass_context
def wait_command(ctx: click.Context, job_ids: tuple[str, ...], timeout_s: float | None,
                 out_dir: Path | None, as_json: bool, client_id: str | None,
                 broker: str | None) -> None:
    """Wait for jobs (or arrays) submitted earlier; unpack results; exit with their status."""
    settings = Settings.from_env()
    out_dir = out_dir or settings.results_dir
    asked = job_ids
    job_ids = tuple(arrays.expand(settings.config_dir, job_ids))
    statuses: dict[str, int] = {}
    pending = []
    for job_id in job_ids:
        record = output.load_saved(out_dir, job_id)
        if record is not None:
            statuses[job_id] = output.shell_status(record)
            text = json.dumps(record) if as_json else f"{job_id}  already done"
            click.echo(text, err=not as_json)
        else:
            pending.append(job_id)
    if pending:
        with client_for(broker, client_id) as client:
            statuses.update(_wait_all(client, pending, out_dir, timeout_s, as_json,
                                      force_bar=len(job_ids) > len(asked)))
    if len(job_ids) > len(asked) and not as_json:
        click.echo(arrays.summary(statuses), err=True)
    ctx.exit(_combined(job_ids, statuses))


def _wait_all(client: Client, job_ids: list[str], out_dir: Path, timeout_s: float | None,
              as_json: bool, *, force_bar: bool = False) -> dict[str, int]:
    if len(job_ids) == 1 and not force_bar:
        return {job_ids[0]: follow(client.attach(job_ids[0]), out_dir, timeout_s, as_json)}
    progress = Progress(enabled=not as_json)
    statuses: dict[str, int] = {}
    left = set(job_ids)
    progress.bar(0, len(job_ids), "done")
    saver = _Saver(out_dir)
    while left:
        update = saver.take(client, left, timeout_s)
        if update is None:
            progress.close()
            click.echo(f"dispatch: still waiting for {len(left)} job(s): {' '.join(sorted(left))}",
                       err=True)
            statuses.update(dict.fromkeys(left, EXIT_TIMEOUT))
            break
        if update.is_final:
            left.discard(update.job_id)
            progress.close()
            statuses[update.job_id] = report(JobResult(update), out_dir, as_json,
                                             saver.saved.pop(update.job_id, None))
            progress.bar(len(job_ids) - len(left), len(job_ids), "done")
    progress.close()
    return statuses


def _combined(job_ids: tuple[str, ...], statuses: dict[str, int]) -> int:
    if len(job_ids) == 1:
        return statuses.get(job_ids[0], 1)
    return 0 if all(statuses.get(j) == 0 for j in job_ids) else 1
