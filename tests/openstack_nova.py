"""The Nova v2.1 and Glance v2 side of the OpenStack double, and the cloud state they serve."""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

PROJECT = "dispatch-project"
USERNAME = "dispatch-robot"
Reply = tuple[int, Any, dict[str, str]]


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


def server_body(state: State, server_id: str, name: str, flavor_id: str, image_id: str,
                metadata: dict[str, str], status: str,
                created: datetime.datetime) -> dict[str, Any]:
    """Return a server as Nova v2.1 shows it."""
    return {
        "id": server_id, "name": name, "status": status, "created": iso(created),
        "updated": iso(created), "metadata": dict(metadata), "tenant_id": PROJECT,
        "user_id": USERNAME, "hostId": "", "key_name": None, "accessIPv4": "",
        "accessIPv6": "", "progress": 0, "links": [],
        "flavor": {"id": flavor_id, "links": []}, "image": {"id": image_id, "links": []},
        "addresses": {"private": [{"addr": state.address, "version": 4,
                                   "OS-EXT-IPS:type": "fixed"}]},
        "OS-EXT-STS:vm_state": status.lower(), "OS-EXT-STS:task_state": None,
        "OS-EXT-STS:power_state": 1 if status == "ACTIVE" else 0,
        "fault": {"code": 500, "message": "No valid host was found."}
        if status == "ERROR" else None,
    }


def compute(state: State, base: str, method: str, path: str, query: dict[str, str],
            body: Any) -> Reply:
    """Answer a Nova v2.1 request; ``path`` follows ``/compute``."""
    version = {"id": "v2.1", "status": "CURRENT", "version": "2.1", "min_version": "2.1",
               "updated": "2013-07-23T11:33:21Z",
               "links": [{"rel": "self", "href": f"{base}/compute/v2.1/"}]}
    if path == "/":
        return 200, {"versions": [version]}, {}
    if path == "/v2.1":
        return 200, {"version": version}, {}
    path = path.removeprefix("/v2.1")
    for pattern, handler in _COMPUTE_ROUTES:
        match = re.fullmatch(pattern, f"{method} {path}")
        if match:
            return handler(state, match, query, body)
    return 404, {"itemNotFound": {"code": 404, "message": f"no route {method} {path}"}}, {}


def _flavors(state: State, *_: Any) -> Reply:
    return 200, {"flavors": list(state.flavors.values())}, {}


def _flavor(state: State, match: re.Match[str], *_: Any) -> Reply:
    flavor = state.flavors.get(match[1]) or next(
        (f for f in state.flavors.values() if f["name"] == match[1]), None)
    if flavor is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Flavor not found"}}, {}
    return 200, {"flavor": flavor}, {}


def _servers(state: State, _m: Any, query: dict[str, str], _b: Any) -> Reply:
    servers = [s for s in state.servers.values()
               if not query.get("name") or re.search(query["name"], s["name"])]
    return 200, {"servers": servers}, {}


def _server_or_404(state: State, server_id: str) -> dict[str, Any] | None:
    return state.servers.get(server_id)


def _get_server(state: State, match: re.Match[str], *_: Any) -> Reply:
    server = _server_or_404(state, match[1])
    if server is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    return 200, {"server": server}, {}


def _create_server(state: State, _m: Any, _q: Any, body: Any) -> Reply:
    spec = body["server"]
    flavor_id, image_id = spec.get("flavorRef", ""), spec.get("imageRef", "")
    if flavor_id not in state.flavors:
        return 400, {"badRequest": {"code": 400, "message": f"Flavor {flavor_id} not found"}}, {}
    if image_id not in state.images:
        return 400, {"badRequest": {"code": 400, "message": f"Image {image_id} not found"}}, {}
    server_id = str(uuid.uuid4())
    status = "ERROR" if image_id in state.failing_images else state.boot_status
    state.servers[server_id] = server_body(
        state, server_id, spec["name"], flavor_id, image_id, spec.get("metadata") or {}, status,
        datetime.datetime.now(datetime.UTC))
    hints = body.get("os:scheduler_hints") or body.get("OS-SCH-HNT:scheduler_hints") or {}
    group = state.groups.get(hints.get("group", "")) if hints.get("group") else None
    if hints.get("group") and group is None:
        del state.servers[server_id]
        return 400, {"badRequest": {"code": 400, "message": "Invalid server group"}}, {}
    state.hints[server_id] = hints
    if group is not None:
        group["members"].append(server_id)
    if spec.get("user_data"):
        state.user_data[server_id] = spec["user_data"]
    return 202, {"server": {"id": server_id, "links": [], "adminPass": "x",
                            "OS-DCF:diskConfig": "MANUAL", "security_groups": []}}, {}


def _delete_server(state: State, match: re.Match[str], *_: Any) -> Reply:
    if state.servers.pop(match[1], None) is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    for group in state.groups.values():  # Nova drops a deleted server from its group
        if match[1] in group["members"]:
            group["members"].remove(match[1])
    return 204, None, {}


def _metadata(state: State, match: re.Match[str], _q: Any, body: Any) -> Reply:
    server = _server_or_404(state, match[2])
    if server is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    if match[1] == "PUT":
        server["metadata"] = dict(body["metadata"])
    elif match[1] == "POST":
        server["metadata"].update(body["metadata"])
    return 200, {"metadata": server["metadata"]}, {}


def _delete_metadata(state: State, match: re.Match[str], *_: Any) -> Reply:
    server = _server_or_404(state, match[1])
    if server is None or match[2] not in server["metadata"]:
        return 404, {"itemNotFound": {"code": 404, "message": "Metadata item not found"}}, {}
    del server["metadata"][match[2]]
    return 204, None, {}


def _action(state: State, match: re.Match[str], _q: Any, body: Any) -> Reply:
    if _server_or_404(state, match[1]) is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server not found"}}, {}
    if "os-getConsoleOutput" in body:
        return 200, {"output": state.console_output}, {}
    return 400, {"badRequest": {"code": 400, "message": "unsupported action"}}, {}


#: Server group policies Nova knows (the soft ones from microversion 2.15).
GROUP_POLICIES = ("affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity")


def _groups(state: State, match: re.Match[str], _q: Any, body: Any) -> Reply:
    if match[1] == "GET":
        return 200, {"server_groups": list(state.groups.values())}, {}
    spec = body["server_group"]
    policies = spec.get("policies") or ([spec["policy"]] if spec.get("policy") else [])
    if len(policies) != 1 or policies[0] not in GROUP_POLICIES:
        return 400, {"badRequest": {"code": 400,
                                    "message": f"Invalid input: policies {policies!r}"}}, {}
    group = {"id": str(uuid.uuid4()), "name": spec["name"], "policies": policies,
             "members": [], "metadata": {}, "project_id": PROJECT, "user_id": USERNAME}
    state.groups[group["id"]] = group
    return 200, {"server_group": group}, {}


def _get_group(state: State, match: re.Match[str], *_: Any) -> Reply:
    group = state.groups.get(match[1])
    if group is None:
        return 404, {"itemNotFound": {"code": 404, "message": "Server group not found"}}, {}
    return 200, {"server_group": group}, {}


def _delete_group(state: State, match: re.Match[str], *_: Any) -> Reply:
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
    (r"GET /os-server-groups/([^/]+)", _get_group),
    (r"DELETE /os-server-groups/([^/]+)", _delete_group),
]


def image(state: State, base: str, method: str, path: str, query: dict[str, str],
          body: Any) -> Reply:
    """Answer a Glance v2 request; ``path`` follows ``/image``."""
    if path == "/":
        return 300, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
            {"rel": "self", "href": f"{base}/image/v2/"}]}]}, {}
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
