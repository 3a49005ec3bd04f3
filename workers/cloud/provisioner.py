"""Booting execute nodes: pick the flavor, check quotas and bans, boot, bootstrap.

Each server is named ``dispatch-<pool>-<8 hex>``, carries the metadata of
:mod:`workers.cloud.metadata`, and runs ``dispatch worker --name <server name>
--pool <pool>`` once bootstrapped (over SSH when an SSH key is configured). Servers
booted for one multi-node job (``Order.gang``) also carry its ``gang`` metadata and boot
into its own server group, ``dispatch-<job id>``.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.cloud import bootstrap, hostkeys, metadata
from workers.cloud.bans import BootFailures
from workers.cloud.errors import BannedError, BootstrapError, CloudConfigError, QuotaError
from workers.cloud.flavors import Flavor, Image, Need, pick
from workers.cloud.servers import Cloud, Server
from workers.cloud.settings import CloudSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Order:
    """What to provision: ``count`` nodes for ``pool``, each meeting ``need``.

    With ``gang`` (a job id), the nodes are for that multi-node job, whose head is ``head``.
    """

    pool: str
    count: int = 1
    need: Need = field(default_factory=Need)
    image: str | None = None
    lifetime_s: int | None = None
    gang: str | None = None
    head: str = ""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")


@dataclass(frozen=True)
class Usage:
    """What Dispatch's servers take from the quotas now."""

    nodes: int
    cores: int
    ram_mb: int


def usage(servers: Sequence[Server], flavors: Sequence[Flavor]) -> Usage:
    """Return the quota use of ``servers`` (unknown flavors count as nothing but a node)."""
    by_id = {f.id: f for f in flavors}
    sized = [by_id.get(s.flavor_id) for s in servers]
    return Usage(nodes=len(servers), cores=sum(f.vcpus for f in sized if f),
                 ram_mb=sum(f.ram_mb for f in sized if f))


def allowed(count: int, flavor: Flavor, used: Usage, settings: CloudSettings) -> int:
    """Return how many of ``count`` servers of ``flavor`` fit the quotas."""
    room = [settings.max_nodes - used.nodes]
    if flavor.vcpus:
        room.append((settings.max_cores - used.cores) // flavor.vcpus)
    if flavor.ram_mb:
        room.append((settings.max_ram_mb - used.ram_mb) // flavor.ram_mb)
    return max(0, min(count, *room))


def choose(cloud: Cloud, settings: CloudSettings, order: Order,
           now: datetime.datetime) -> tuple[Image, Flavor]:
    """Return the image and the smallest unbanned flavor for ``order``.

    Raises BannedError for a banned image, NoFlavorError when no flavor fits.
    """
    image_name = order.image or settings.image
    if not image_name:
        raise CloudConfigError("no image: pass --image or set DISPATCH_CLOUD_IMAGE")
    image = cloud.image(image_name)
    bans = BootFailures(settings.state_dir, ban_after=settings.ban_after,
                        ban_for_s=settings.ban_for_s).current(now)
    if image.id in bans.images:
        raise BannedError(f"image {image.name} is banned after repeated boot failures")
    return image, pick(cloud.flavors(), order.need, image, excluded=bans.flavors)


def provision(cloud: Cloud, settings: CloudSettings, order: Order, *,
              now: datetime.datetime | None = None, partial: bool = False,
              bootstrap_now: bool = True) -> list[Server]:
    """Boot ``order.count`` servers (fewer if ``partial`` and quotas say so); return them.

    With an SSH key configured, each is bootstrapped before this returns, unless
    ``bootstrap_now`` is False (the caller then bootstraps them: :func:`bootstrap_server`).

    Raises QuotaError when none may boot (or not all, unless ``partial``),
    BannedError for a banned image, NoFlavorError when no flavor fits.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    image, flavor = choose(cloud, settings, order, now)
    count = allowed(order.count, flavor, usage(cloud.servers(), cloud.flavors()), settings)
    if count == 0 or (count < order.count and not partial):
        raise QuotaError(f"{order.count} x {flavor.name} would pass the quotas "
                         f"(max {settings.max_nodes} nodes, {settings.max_cores} cores, "
                         f"{settings.max_ram_mb} MiB RAM); room for {count}")
    group_id = _group(cloud, settings, order)
    lifetime_s = order.lifetime_s or settings.lifetime_s
    booted = []
    for _ in range(count):
        name = f"dispatch-{order.pool}-{uuid.uuid4().hex[:8]}"
        meta = metadata.initial(pool=order.pool, owner=settings.owner, lifetime_s=lifetime_s,
                                now=now)
        if order.gang:
            meta.update(metadata.gang(job_id=order.gang, head=order.head, now=now))
        booted.append(cloud.boot(name, flavor, image, meta, network=settings.network,
                                 key_name=settings.key_name, group_id=group_id))
    if settings.ssh_key is not None and bootstrap_now:
        booted = [bootstrap_server(cloud, settings, server) for server in booted]
    return booted


def _group(cloud: Cloud, settings: CloudSettings, order: Order) -> str | None:
    """Return the id of the server group the order's servers boot into, if any."""
    if order.gang:
        return cloud.server_group(metadata.gang_group(order.gang), settings.gang_policy)
    if settings.server_group_policy:
        return cloud.server_group(f"dispatch-{order.pool}", settings.server_group_policy)
    return None


def bootstrap_server(cloud: Cloud, settings: CloudSettings, server: Server) -> Server:
    """Wait for ``server``, trust the host key its console shows, start its worker."""
    key_file = settings.ssh_key
    if key_file is None:
        raise CloudConfigError("DISPATCH_CLOUD_SSH_KEY is not set: cannot bootstrap over SSH")
    server = cloud.wait_active(server.id, timeout_s=settings.boot_timeout_s)
    if not server.address:
        raise BootstrapError(f"server {server.name} has no IPv4 address to reach")
    known_hosts = settings.known_hosts
    if known_hosts is None:
        raise CloudConfigError("DISPATCH_CLOUD_KNOWN_HOSTS is not set: SSH host keys "
                               "must be checked against a known_hosts file")
    keys = hostkeys.from_console(cloud.console_output(server.id))
    if keys:
        hostkeys.remember(known_hosts, server.address, settings.ssh_port, keys)
    else:
        log.warning("server %s: no host keys on its console; relying on %s", server.name,
                    known_hosts)
    target = bootstrap.Target(host=server.address, port=settings.ssh_port,
                              user=settings.ssh_user, key_file=key_file,
                              known_hosts=known_hosts)
    bootstrap.start_worker(target, bootstrap.WorkerSpec(
        node=server.name, pool=server.pool, broker_url=settings.broker_url,
        dispatch=settings.remote_dispatch, worker_args=settings.worker_args),
        payload=settings.payload, remote_dir=settings.remote_dir)
    return server
