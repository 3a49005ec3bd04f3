"""An HTTP double of the OpenStack APIs the cloud plane uses, served by the stdlib.

Keystone v3 (version discovery, password tokens, token checks), Nova v2.1 (flavors,
servers, server metadata, console output, server groups) and Glance v2 (images).
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

USERNAME = "dispatch-robot"
PASSWORD = "double-pass-7f3a9c"
PROJECT = "dispatch-project"


def iso(moment: datetime.datetime) -> str:
    """Return ``moment`` the way Nova writes timestamps."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Recorded:
    """One request the double served."""

    method: str
    path: str
    body: Any


@dataclass
class State:
    """Everything the double's cloud holds."""

    flavors: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    hints: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_data: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    boot_status: str = "ACTIVE"
    failing_images: set[str] = field(default_factory=set)
    address: str = "127.0.0.1"
    console_output: str = ""
    delete_delay_s: float = 0.0  # a slow cloud: lets overlapping reap runs really overlap


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
        self.state.servers[server_id] = self._server(server_id, name, flavor_id, image_id,
                                                     metadata or {}, status, created)
        return server_id

    def _server(self, server_id: str, name: str, flavor_id: str, image_id: str,
                metadata: dict[str, str], status: str,
                created: datetime.datetime) -> dict[str, Any]:
        return {
            "id": server_id, "name": name, "status": status, "created": iso(created),
            "updated": iso(created), "metadata": dict(metadata), "tenant_id": PROJECT,
            "user_id": USERNAME, "hostId": "", "key_name": None, "accessIPv4": "",
            "accessIPv6": "", "progress": 0, "links": [],
            "flavor": {"id": flavor_id, "links": []}, "image": {"id": image_id, "links": []},
            "addresses": {"private": [{"addr": self.state.address, "version": 4,
                                       "OS-EXT-IPS:type": "fixed"}]},
            "OS-EXT-STS:vm_state": status.lower(), "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:power_state": 1 if status == "ACTIVE" else 0,
            "fault": {"code": 500, "message": "No valid host was found."}
            if status == "ERROR" else None,
        }

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


Reply = tuple[int, Any, dict[str, str]]


def _route(double: OpenStackDouble, method: str, path: str, query: dict[str, str],
           body: Any) -> Reply:
    for prefix, handler in (("/identity", _identity), ("/compute", _compute),
                            ("/image", _image)):
        if path.startswith(prefix):
            return handler(double, method, path[len(prefix):] or "/", query, body)
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


def _compute(double: OpenStackDouble, method: str, path: str, query: dict[str, str],
             body: Any) -> Reply:
    version = {"id": "v2.1", "status": "CURRENT", "version": "2.1", "min_version": "2.1",
               "updated": "2013-07-23T11:33:21Z",
               "links": [{"rel": "self", "href": f"{double.base}/compute/v2.1/"}]}
    if path == "/":
        return 200, {"versions": [version]}, {}
    if path == "/v2.1":
        return 200, {"version": version}, {}
    path = path.removeprefix("/v2.1")
    for pattern, handler in _COMPUTE_ROUTES:
        match = re.fullmatch(pattern, f"{method} {path}")
        if match:
            return handler(double.state, double, match, query, body)
    return 404, {"itemNotFound": {"code": 404, "message": f"no route {method} {path}"}}, {}


def _flavors(state: State, *_: Any) -> Reply:
    return 200, {"flavors": list(state.flavors.values())}, {}


def _flavor(state: State, _d: Any, match: re.Match[str], *_: Any) -> Reply:
    flavor = state.flavors.get(match[1]) or next(
        (f for f in state.flavors.values() if f["name"] == match[1]), None)
    if flavor is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Flavor not found"}}, {}
    return 200, {"flavor": flavor}, {}


def _servers(state: State, _d: Any, _m: Any, query: dict[str, str], _b: Any) -> Reply:
    servers = [s for s in state.servers.values()
               if not query.get("name") or re.search(query["name"], s["name"])]
    return 200, {"servers": servers}, {}


def _server_or_404(state: State, server_id: str) -> dict[str, Any] | None:
    return state.servers.get(server_id)


def _get_server(state: State, _d: Any, match: re.Match[str], *_: Any) -> Reply:
    server = _server_or_404(state, match[1])
    if server is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    return 200, {"server": server}, {}


def _create_server(state: State, double: OpenStackDouble, _m: Any, _q: Any,
                   body: Any) -> Reply:
    spec = body["server"]
    flavor_id, image_id = spec.get("flavorRef", ""), spec.get("imageRef", "")
    if flavor_id not in state.flavors:
        return 400, {"badRequest": {"code": 400, "message": f"Flavor {flavor_id} not found"}}, {}
    if image_id not in state.images:
        return 400, {"badRequest": {"code": 400, "message": f"Image {image_id} not found"}}, {}
    server_id = str(uuid.uuid4())
    status = "ERROR" if image_id in state.failing_images else state.boot_status
    state.servers[server_id] = double._server(
        server_id, spec["name"], flavor_id, image_id, spec.get("metadata") or {}, status,
        datetime.datetime.now(datetime.UTC))
    state.hints[server_id] = body.get("os:scheduler_hints") or {}
    if spec.get("user_data"):
        state.user_data[server_id] = spec["user_data"]
    return 202, {"server": {"id": server_id, "links": [], "adminPass": "x",
                            "OS-DCF:diskConfig": "MANUAL", "security_groups": []}}, {}


def _delete_server(state: State, _d: Any, match: re.Match[str], *_: Any) -> Reply:
    if state.servers.pop(match[1], None) is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    return 204, None, {}


def _metadata(state: State, _d: Any, match: re.Match[str], _q: Any, body: Any) -> Reply:
    server = _server_or_404(state, match[2])
    if server is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    if match[1] == "PUT":
        server["metadata"] = dict(body["metadata"])
    elif match[1] == "POST":
        server["metadata"].update(body["metadata"])
    return 200, {"metadata": server["metadata"]}, {}


def _delete_metadata(state: State, _d: Any, match: re.Match[str], *_: Any) -> Reply:
    server = _server_or_404(state, match[1])
    if server is None or match[2] not in server["metadata"]:
        return 404, {"itemNotFound": {"code": 404, "message": "Metadata item not found"}}, {}
    del server["metadata"][match[2]]
    return 204, None, {}


def _action(state: State, _d: Any, match: re.Match[str], _q: Any, body: Any) -> Reply:
    if _server_or_404(state, match[1]) is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    if "os-getConsoleOutput" in body:
        return 200, {"output": state.console_output}, {}
    return 400, {"badRequest": {"code": 400, "message": "unsupported action"}}, {}


def _groups(state: State, _d: Any, match: re.Match[str], _q: Any, body: Any) -> Reply:
    if match[1] == "GET":
        return 200, {"server_groups": list(state.groups.values())}, {}
    spec = body["server_group"]
    group = {"id": str(uuid.uuid4()), "name": spec["name"], "policies": spec["policies"],
             "members": [], "metadata": {}}
    state.groups[group["id"]] = group
    return 200, {"server_group": group}, {}


def _delete_group(state: State, _d: Any, match: re.Match[str], *_: Any) -> Reply:
    if state.groups.pop(match[1], None) is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server group not found"}}, {}
    return 204, None, {}


_COMPUTE_ROUTES: list[tuple[str, Any]] = [
    (r"GET /flavors(?:/detail)?", _flavors),
    (r"GET /flavors/([^/]+)", _flavor),
    (r"GET /servers(?:/detail)?", _servers),
    (r"POST /servers", _create_server),
    (r"(GET|POST|PUT) /servers/([^/]+)/metadata", _metadata),
    (r"DELETE /servers/([^/]+)/metadata/([^/]+)", _delete_metadata),
    (r"POST /servers/([^/]+)/action", _action),
    (r"GET /servers/([^/]+)", _get_server),
    (r"DELETE /servers/([^/]+)", _delete_server),
    (r"(GET|POST) /os-server-groups", _groups),
    (r"DELETE /os-server-groups/([^/]+)", _delete_group),
]


def _image(double: OpenStackDouble, method: str, path: str, query: dict[str, str],
           body: Any) -> Reply:
    state = double.state
    if path == "/":
        return 300, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
            {"rel": "self", "href": f"{double.base}/image/v2/"}]}]}, {}
    if method == "GET" and path == "/v2/images":
        images = [i for i in state.images.values()
                  if not query.get("name") or i["name"] == query["name"]]
        return 200, {"images": images, "first": "/v2/images", "schema": "/v2/schemas/images"}, {}
    match = re.fullmatch(r"/v2/images/([^/]+)", path)
    if method == "GET" and match:
        image = state.images.get(match[1])
        if image is None:
            return 404, {"message": "image not found"}, {}
        return 200, image, {}
    return 404, {"message": f"no image route {method} {path}"}, {}
