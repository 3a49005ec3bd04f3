"""``dispatch cloud``: flavors, nodes, provision, reap, extend (registered through an entry point).

Every command reads the ``DISPATCH_*`` settings of :mod:`workers.cloud.settings`;
``--clouds-yaml`` and ``--cloud`` override the cloud choice.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dispatch.progress import table
from dispatch.quantity import format_duration, parse_duration_s, parse_size_mib
from workers.cloud import metadata
from workers.cloud.flavors import Need
from workers.cloud.settings import CloudSettings

if TYPE_CHECKING:  # openstacksdk, fabric and kombu load only when a command runs
    from workers.cloud.reaping import NodeView
    from workers.cloud.servers import Cloud, Server


@click.group("cloud")
@click.option("--clouds-yaml", type=click.Path(dir_okay=False, path_type=Path),
              help="clouds.yaml to use (default: $DISPATCH_CLOUDS_YAML).")
@click.option("--cloud", "cloud_name", help="Cloud name in it (default: $DISPATCH_CLOUD).")
@click.pass_context
def cloud(ctx: click.Context, clouds_yaml: Path | None, cloud_name: str | None) -> None:
    """Execute nodes on OpenStack: flavors, nodes, provision, reap, extend."""
    settings = CloudSettings.from_env()
    if clouds_yaml is not None:
        settings = dataclasses.replace(settings, clouds_yaml=clouds_yaml)
    if cloud_name:
        settings = dataclasses.replace(settings, cloud=cloud_name)
    ctx.obj = settings


def _connect(settings: CloudSettings) -> Cloud:
    from workers.cloud.servers import Cloud  # noqa: PLC0415 - keeps `dispatch` startup fast

    return Cloud.connect(settings.require_clouds_yaml(), settings.cloud)


def _emit(rows: Sequence[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
    else:
        click.echo(table(rows, columns))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@cloud.command("flavors")
@json_option
@click.pass_obj
def flavors_command(settings: CloudSettings, as_json: bool) -> None:
    """List the flavors this project may boot, smallest first."""
    with _connect(settings) as conn:
        flavors = sorted(conn.flavors(), key=lambda f: f.size_key())
    rows = [{"name": f.name, "id": f.id, "vcpus": f.vcpus, "ram_mb": f.ram_mb,
             "disk_gb": f.disk_gb, "ephemeral_gb": f.ephemeral_gb, "public": f.is_public}
            for f in flavors]
    _emit(rows, ["name", "id", "vcpus", "ram_mb", "disk_gb", "ephemeral_gb", "public"], as_json)


@cloud.command("nodes")
@json_option
@click.pass_obj
def nodes_command(settings: CloudSettings, as_json: bool) -> None:
    """List Dispatch's servers: pool, flavor, age, lifetime left, state, jobs."""
    from workers.cloud import reaper  # noqa: PLC0415

    now = datetime.datetime.now(datetime.UTC)
    with _connect(settings) as conn:
        servers = conn.servers()
        flavor_names = {f.id: f.name for f in conn.flavors()}
    nodes = reaper.ledger_nodes(settings.ledger_url, now)
    rows = [_node_row(s, flavor_names, nodes, now) for s in sorted(servers, key=lambda s: s.name)]
    _emit(rows, ["server", "pool", "flavor", "age", "left", "state", "jobs"], as_json)


def _node_row(server: Server, flavor_names: dict[str, str],
              nodes: dict[str, NodeView] | Any, now: datetime.datetime) -> dict[str, Any]:
    node = nodes.get(server.name) if nodes is not None else None
    expires = server.expires_at
    if node is None:
        worker = "no worker" if nodes is not None else "?"
        jobs = ""
    else:
        worker = ("draining" if node.draining else "offline" if not node.online
                  else "busy" if node.running else "idle")
        jobs = f"{len(node.running)} running, {getattr(node, 'jobs_done', 0)} done"
    if server.metadata.get(metadata.DRAIN_REQUESTED_AT) and worker != "offline":
        worker = "draining"
    return {
        "server": server.name, "pool": server.pool,
        "flavor": flavor_names.get(server.flavor_id, server.flavor_id),
        "age": format_duration((now - server.created_at).total_seconds()),
        "left": "" if expires is None else
        format_duration(max(0.0, (expires - now).total_seconds())),
        "state": f"{server.status}/{worker}", "jobs": jobs,
        "expires_at": None if expires is None else metadata.stamp(expires),
    }


@cloud.command("provision")
@click.argument("pool")
@click.option("-n", "--count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--cpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--memory", default="0", help="Memory each node needs, e.g. 4G.")
@click.option("--scratch", default="0", help="Scratch (ephemeral) disk, e.g. 10G.")
@click.option("--image", help="Image name or id (default: $DISPATCH_CLOUD_IMAGE).")
@click.option("--lifetime", help="Lifetime, e.g. 12h (default: $DISPATCH_CLOUD_LIFETIME).")
@click.pass_obj
def provision_command(settings: CloudSettings, pool: str, count: int, cpus: int, memory: str,  # noqa: PLR0917
                      scratch: str, image: str | None, lifetime: str | None) -> None:
    """Boot COUNT nodes for POOL on the smallest flavor that fits, and bootstrap them."""
    from workers.cloud import lock  # noqa: PLC0415
    from workers.cloud.provisioner import Order, provision  # noqa: PLC0415

    need = Need(cpus=cpus, memory_mb=_size(memory, "--memory"),
                scratch_mb=_size(scratch, "--scratch"))
    lifetime_s = _duration(lifetime, "--lifetime") if lifetime else None
    order = Order(pool=pool, count=count, need=need, image=image, lifetime_s=lifetime_s)
    with lock.held(settings.broker_url, lock.PROVISION), _connect(settings) as conn:
        servers = provision(conn, settings, order)
        flavor_names = {f.id: f.name for f in conn.flavors()}
    for server in servers:
        click.echo(f"{server.name}\t{flavor_names.get(server.flavor_id, server.flavor_id)}\t"
                   f"{server.status}")


@cloud.command("reap")
@click.option("--dry-run", is_flag=True, help="Only show what would be done and why.")
@json_option
@click.pass_obj
def reap_command(settings: CloudSettings, dry_run: bool, as_json: bool) -> None:
    """Drain or delete expired, failed, unregistered and idle servers (as beat does)."""
    from workers.cloud import lock, reaper  # noqa: PLC0415

    with lock.held(settings.broker_url, lock.REAP), _connect(settings) as conn:
        verdicts = reaper.reap(conn, settings, dry_run=dry_run)
    rows = [{"server": v.server.name, "pool": v.server.pool,
             "action": v.action.value if not dry_run else f"would {v.action.value}",
             "reason": v.reason} for v in verdicts]
    if not rows and not as_json:
        click.echo("nothing to reap")
        return
    _emit(rows, ["server", "pool", "action", "reason"], as_json)


@cloud.command("extend")
@click.argument("node")
@click.argument("duration")
@click.pass_obj
def extend_command(settings: CloudSettings, node: str, duration: str) -> None:
    """Give NODE (a server name) DURATION (e.g. 2h) more life."""
    from workers.cloud import reaper  # noqa: PLC0415

    extra_s = _duration(duration, "DURATION")
    with _connect(settings) as conn:
        new_end = reaper.extend(conn, node, extra_s)
    click.echo(f"{node} now expires at {metadata.stamp(new_end)}")


def _size(value: str, hint: str) -> int:
    try:
        return parse_size_mib(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _duration(value: str, hint: str) -> int:
    try:
        seconds = parse_duration_s(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", param_hint=hint)
    return seconds
