"""The one module that uses openstacksdk: flavors, images, servers, metadata, server groups.

The cloud is chosen by a clouds.yaml whose path is always given (never looked up in
the working directory, never merged with ``OS_*`` variables) and a cloud name in it.
openstacksdk and keystoneauth exceptions become :mod:`workers.cloud.errors` here;
their messages name the call, never credentials.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import keystoneauth1.exceptions
import openstack.connection
import openstack.exceptions
from openstack.config import loader

from workers.cloud import metadata
from workers.cloud.errors import CloudApiError, CloudConfigError, CloudError
from workers.cloud.flavors import Flavor, Image

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Server:
    """A server as the cloud plane sees it."""

    id: str
    name: str
    status: str
    flavor_id: str
    image_id: str
    created_at: datetime.datetime
    address: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def pool(self) -> str:
        """Return the pool this server's worker serves ('' if not recorded)."""
        return self.metadata.get(metadata.POOL, "")

    @property
    def expires_at(self) -> datetime.datetime | None:
        """Return when this server's lifetime ends, if it has one."""
        return metadata.expires_at(self.metadata, self.created_at)


@dataclass(frozen=True)
class ServerGroup:
    """A Nova server group: its name, policy and the ids of its member servers."""

    id: str
    name: str
    policy: str
    members: tuple[str, ...] = ()


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn openstacksdk and keystoneauth exceptions raised in the block into CloudError."""
    try:
        yield
    except openstack.exceptions.ConfigException as exc:
        raise CloudConfigError(f"{action}: cloud configuration: {exc}") from None
    except openstack.exceptions.HttpException as exc:
        detail = exc.details or exc.message
        raise CloudApiError(f"{action}: HTTP {exc.status_code}: {detail}") from None
    except openstack.exceptions.SDKException as exc:
        raise CloudApiError(f"{action}: {exc}") from None
    except keystoneauth1.exceptions.ClientException as exc:
        raise CloudApiError(f"{action}: {type(exc).__name__}: {exc}") from None


class Cloud:
    """One authenticated connection to one OpenStack cloud."""

    def __init__(self, conn: openstack.connection.Connection, name: str) -> None:
        self._conn = conn
        self.name = name

    @classmethod
    def connect(cls, clouds_yaml: Path, cloud: str) -> Cloud:
        """Connect to ``cloud`` as described in the clouds.yaml at ``clouds_yaml``."""
        if not clouds_yaml.is_file():
            raise CloudConfigError(f"clouds.yaml not found at {clouds_yaml} "
                                   "(set DISPATCH_CLOUDS_YAML)")
        with translated(f"loading cloud {cloud!r} from {clouds_yaml}"):
            config = loader.OpenStackConfig(config_files=[str(clouds_yaml)], vendor_files=[],
                                            secure_files=[], load_envvars=False)
            if cloud not in config.get_cloud_names():
                raise CloudConfigError(f"cloud {cloud!r} is not in {clouds_yaml} "
                                       "(set DISPATCH_CLOUD)")
            region = config.get_one(cloud=cloud)
            conn = openstack.connection.Connection(config=region)
        return cls(conn, cloud)

    def close(self) -> None:
        """Close the connection's HTTP sessions."""
        self._conn.close()

    def __enter__(self) -> Cloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        with translated(action):
            return fn()

    def flavors(self) -> list[Flavor]:
        """Return every flavor this project may use."""
        raw = self._call("listing flavors", lambda: list(self._conn.compute.flavors()))
        return [Flavor(id=str(f.id), name=str(f.name), vcpus=int(f.vcpus or 0),
                       ram_mb=int(f.ram or 0), disk_gb=int(f.disk or 0),
                       ephemeral_gb=int(f.ephemeral or 0), is_public=bool(f.is_public))
                for f in raw]

    def image(self, name_or_id: str) -> Image:
        """Return the image named (or with id) ``name_or_id``."""
        raw = self._call(f"finding image {name_or_id!r}",
                         lambda: self._conn.image.find_image(name_or_id, ignore_missing=True))
        if raw is None:
            raise CloudApiError(f"no image named {name_or_id!r} on cloud {self.name}")
        return Image(id=str(raw.id), name=str(raw.name), min_ram_mb=int(raw.min_ram or 0),
                     min_disk_gb=int(raw.min_disk or 0), size_bytes=int(raw.size or 0))

    def servers(self, *, ours_only: bool = True) -> list[Server]:
        """Return the project's servers; only Dispatch's unless ``ours_only`` is False.

        Nova cannot filter on metadata, so the filter runs here.
        """
        raw = self._call("listing servers",
                         lambda: list(self._conn.compute.servers(details=True)))
        servers = [_server(s) for s in raw]
        return [s for s in servers if metadata.is_ours(s.metadata)] if ours_only else servers

    def server(self, server_id: str) -> Server | None:
        """Return one server, or None when it does not exist."""
        raw = self._call(f"reading server {server_id}", lambda: self._conn.compute.find_server(
            server_id, ignore_missing=True))
        return None if raw is None else self.refresh(str(raw.id))

    def refresh(self, server_id: str) -> Server:
        """Return the current state of the server with id ``server_id``."""
        return _server(self._call(f"reading server {server_id}",
                                  lambda: self._conn.compute.get_server(server_id)))

    def boot(self, name: str, flavor: Flavor, image: Image, meta: Mapping[str, str], *,
             network: str | None = None, key_name: str | None = None,
             user_data: str | None = None, group_id: str | None = None) -> Server:
        """Boot one server; return it as soon as Nova accepted it (status BUILD or later)."""
        args: dict[str, Any] = {"name": name, "flavor_id": flavor.id, "image_id": image.id,
                                "metadata": dict(meta)}
        if network:
            args["networks"] = [{"uuid": network}]
        if key_name:
            args["key_name"] = key_name
        if user_data:
            args["user_data"] = user_data
        if group_id:
            args["scheduler_hints"] = {"group": group_id}
        created = self._call(f"booting server {name}",
                             lambda: self._conn.compute.create_server(**args))
        log.info("server %s: booting %s on %s (id %s)", name, image.name, flavor.name, created.id)
        return self.refresh(str(created.id))

    def wait_active(self, server_id: str, timeout_s: float, poll_s: float = 1.0) -> Server:
        """Wait until a server is ACTIVE; raise CloudApiError on ERROR or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            server = self.refresh(server_id)
            if server.status == "ACTIVE":
                return server
            if server.status == "ERROR":
                raise CloudApiError(f"server {server.name} went into ERROR while booting")
            if time.monotonic() >= deadline:
                raise CloudApiError(f"server {server.name} not ACTIVE after {timeout_s:.0f} s "
                                    f"(status {server.status})")
            time.sleep(poll_s)

    def delete(self, server_id: str) -> bool:
        """Delete a server; return False when it was already gone."""
        try:
            self._call(f"deleting server {server_id}", lambda: self._conn.compute.delete_server(
                server_id, ignore_missing=False))
        except CloudApiError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise
        return True

    def update_metadata(self, server_id: str, values: Mapping[str, str]) -> None:
        """Set metadata items on a server, keeping the others."""
        self._call(f"updating metadata of server {server_id}",
                   lambda: self._conn.compute.set_server_metadata(server_id, **values))

    def console_output(self, server_id: str) -> str:
        """Return the server's console log (cloud-init prints its SSH host keys there)."""
        raw = self._call(f"reading console of server {server_id}",
                         lambda: self._conn.compute.get_server_console_output(server_id))
        return str(raw.get("output") or "") if isinstance(raw, dict) else str(raw or "")

    def server_groups(self) -> list[ServerGroup]:
        """Return the project's server groups."""
        raw = self._call("listing server groups",
                         lambda: list(self._conn.compute.server_groups()))
        return [ServerGroup(id=str(g.id), name=str(g.name),
                            policy=str(g.policy or (g.policies or [""])[0]),
                            members=tuple(str(m) for m in g.member_ids or ()))
                for g in raw]

    def find_server_group(self, name: str) -> ServerGroup | None:
        """Return the server group named ``name``, or None (names are not unique in
        Nova: the first listed wins)."""
        return next((g for g in self.server_groups() if g.name == name), None)

    def server_group(self, name: str, policy: str) -> str:
        """Return the id of the server group ``name``, creating it with ``policy`` if missing."""
        group = self.find_server_group(name)
        if group is not None:
            return group.id
        created = self._call(f"creating server group {name}",
                             lambda: self._conn.compute.create_server_group(
                                 name=name, policies=[policy]))
        log.info("server group %s: created (%s, id %s)", name, policy, created.id)
        return str(created.id)

    def delete_server_group(self, group_id: str) -> bool:
        """Delete a server group; return False when it was already gone."""
        try:
            self._call(f"deleting server group {group_id}",
                       lambda: self._conn.compute.delete_server_group(
                           group_id, ignore_missing=False))
        except CloudApiError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise
        return True


def _server(raw: Any) -> Server:
    flavor = raw.flavor
    flavor_id = str(getattr(flavor, "id", None) or getattr(flavor, "original_name", "") or "")
    image = raw.image
    return Server(
        id=str(raw.id), name=str(raw.name), status=str(raw.status or "UNKNOWN"),
        flavor_id=flavor_id, image_id=str(getattr(image, "id", "") or ""),
        created_at=metadata.parse_time(raw.created_at) or datetime.datetime.now(datetime.UTC),
        address=_address(raw), metadata=dict(raw.metadata or {}))


def _address(raw: Any) -> str | None:
    if raw.access_ipv4:
        return str(raw.access_ipv4)
    for entries in (raw.addresses or {}).values():
        for entry in entries:
            if entry.get("version") == 4:
                return str(entry["addr"])
    return None


__all__ = ["Cloud", "CloudError", "Server", "ServerGroup", "translated"]
