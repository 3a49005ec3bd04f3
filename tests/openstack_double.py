"""An HTTP double of the OpenStack APIs the cloud plane uses, served by the stdlib.

Keystone v3 (version discovery, password tokens, token checks), Nova v2.1 (flavors,
servers, server metadata, console output, server groups with their members and the
``group`` scheduler hint) and Glance v2 (images).
openstacksdk talks to it over real HTTP through a clouds.yaml; tests seed it
(flavors, images, old servers), steer it (the status new servers boot into, the
console output carrying SSH host keys) and read back every request it served.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from openstack_nova import (
    PROJECT,
    USERNAME,
    Recorded,
    Reply,
    State,
    compute,
    image,
    iso,
    server_body,
)

PASSWORD = "double-pass-7f3a9c"


class OpenStackDouble:
    """A running double; ``write_clouds_yaml`` points openstacksdk at it."""

    def __init__(self) -> None:
        self.state = State()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> OpenStackDouble:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def write_clouds_yaml(self, path: Path, cloud: str = "double") -> Path:
        """Write a clouds.yaml naming this double as cloud ``cloud``; return its path."""
        config = {"clouds": {cloud: {
            "auth_type": "password",
            "auth": {"auth_url": f"{self.base}/identity/v3", "username": USERNAME,
                     "password": PASSWORD, "project_name": PROJECT,
                     "user_domain_name": "Default", "project_domain_name": "Default"},
            "region_name": "RegionOne", "interface": "public", "identity_api_version": 3,
        }}}
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        path.chmod(0o600)
        return path

    # Seeding -----------------------------------------------------------------------------
    def add_flavor(self, flavor_id: str, name: str, vcpus: int, ram_mb: int, disk_gb: int,
                   ephemeral_gb: int = 0, *, is_public: bool = True) -> None:
        """Offer a flavor."""
        self.state.flavors[flavor_id] = {
            "id": flavor_id, "name": name, "vcpus": vcpus, "ram": ram_mb, "disk": disk_gb,
            "OS-FLV-EXT-DATA:ephemeral": ephemeral_gb, "swap": "",
            "os-flavor-access:is_public": is_public, "rxtx_factor": 1.0,
            "OS-FLV-DISABLED:disabled": False, "links": []}

    def add_image(self, name: str, *, min_ram_mb: int = 0, min_disk_gb: int = 0,
                  size_bytes: int = 0) -> str:
        """Offer an active image; return its id."""
        image_id = str(uuid.uuid4())
        now = iso(datetime.datetime.now(datetime.UTC))
        self.state.images[image_id] = {
            "id": image_id, "name": name, "status": "active", "min_ram": min_ram_mb,
            "min_disk": min_disk_gb, "size": size_bytes, "visibility": "public",
            "disk_format": "qcow2", "container_format": "bare", "created_at": now,
            "updated_at": now, "tags": [], "protected": False, "owner": PROJECT,
            "self": f"/v2/images/{image_id}", "file": f"/v2/images/{image_id}/file",
            "schema": "/v2/schemas/image"}
        return image_id

    def add_server(self, name: str, *, metadata: dict[str, str] | None = None,
                   status: str = "ACTIVE", created: datetime.datetime | None = None,
                   flavor_id: str = "", image_id: str = "") -> str:
        """Add a server as if booted earlier; return its id."""
        server_id = str(uuid.uuid4())
        created = created or datetime.datetime.now(datetime.UTC)
        self.state.servers[server_id] = server_body(self.state, server_id, name, flavor_id,
                                                    image_id, metadata or {}, status, created)
        return server_id

    # Reading back ------------------------------------------------------------------------
    def calls(self, method: str, pattern: str) -> list[Recorded]:
        """Return the requests with ``method`` whose path matches the regex ``pattern``."""
        with self.lock:
            return [r for r in self.state.requests
                    if r.method == method and re.search(pattern, r.path)]

    def deleted_servers(self) -> list[str]:
        """Return the ids of every server DELETE request served, repeats included."""
        return [r.path.rsplit("/", 1)[1] for r in self.calls("DELETE", r"/servers/[^/]+$")]

    def server_names(self) -> set[str]:
        """Return the names of the servers that exist now."""
        with self.lock:
            return {s["name"] for s in self.state.servers.values()}

    def group_named(self, name: str) -> dict[str, Any] | None:
        """Return the server group named ``name`` (members included), or None."""
        with self.lock:
            return next((dict(g, members=list(g["members"]))
                         for g in self.state.groups.values() if g["name"] == name), None)

    def by_name(self, name: str) -> dict[str, Any]:
        """Return the server named ``name``."""
        with self.lock:
            return next(s for s in self.state.servers.values() if s["name"] == name)


def _handler_for(double: OpenStackDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.double = double
    return Handler


class _Handler(BaseHTTPRequestHandler):
    double: OpenStackDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        double = self.double
        if method == "DELETE" and double.state.delete_delay_s:
            time.sleep(double.state.delete_delay_s)
        with double.lock:
            double.state.requests.append(Recorded(method, path, body))
            if not path.startswith("/identity") and \
                    self.headers.get("X-Auth-Token") not in double.state.tokens:
                self._send(401, {"error": {"code": 401, "message": "token required"}})
                return
            status, payload, headers = _route(double, method, path, query, body)
        self._send(status, payload, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _route(double: OpenStackDouble, method: str, path: str, query: dict[str, str],
           body: Any) -> Reply:
    rest = path.split("/", 2)[-1] if path.count("/") > 1 else ""
    for prefix, handler in (("/compute", compute), ("/image", image)):
        if path.startswith(prefix):
            return handler(double.state, double.base, method, "/" + rest, query, body)
    if path.startswith("/identity"):
        return _identity(double, method, path[len("/identity"):] or "/", query, body)
    return 404, {"error": "not found"}, {}


def _identity(double: OpenStackDouble, method: str, path: str, query: dict[str, str],
              body: Any) -> Reply:
    base = double.base
    version = {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
               "links": [{"rel": "self", "href": f"{base}/identity/v3/"}],
               "media-types": [{"base": "application/json",
                                "type": "application/vnd.openstack.identity-v3+json"}]}
    if method == "GET" and path == "/":
        return 300, {"versions": {"values": [version]}}, {}
    if method == "GET" and path == "/v3":
        return 200, {"version": version}, {}
    if method == "POST" and path == "/v3/auth/tokens":
        return _issue_token(double, body)
    return 404, {"error": f"no identity route {method} {path}"}, {}


def _issue_token(double: OpenStackDouble, body: Any) -> Reply:
    user = body["auth"]["identity"]["password"]["user"]
    if user.get("name") != USERNAME or user.get("password") != PASSWORD:
        return 401, {"error": {"code": 401, "message": "The request you have made requires "
                               "authentication.", "title": "Unauthorized"}}, {}
    token = uuid.uuid4().hex
    double.state.tokens.add(token)
    now = datetime.datetime.now(datetime.UTC)
    base = double.base

    def endpoint(kind: str, url: str) -> dict[str, Any]:
        return {"type": kind, "name": kind, "id": kind, "endpoints": [
            {"id": f"{kind}-{iface}", "interface": iface, "region": "RegionOne",
             "region_id": "RegionOne", "url": url} for iface in ("public", "internal")]}

    payload = {"token": {
        "methods": ["password"], "expires_at": iso(now + datetime.timedelta(hours=1)),
        "issued_at": iso(now), "user": {"id": USERNAME, "name": USERNAME,
                                        "domain": {"id": "default", "name": "Default"}},
        "project": {"id": PROJECT, "name": PROJECT,
                    "domain": {"id": "default", "name": "Default"}},
        "roles": [{"id": "member", "name": "member"}],
        "catalog": [endpoint("compute", f"{base}/compute/v2.1"),
                    endpoint("image", f"{base}/image"),
                    endpoint("identity", f"{base}/identity/v3")]}}
    return 201, payload, {"X-Subject-Token": token}


