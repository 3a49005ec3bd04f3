"""The reaping rules (pure) and metadata lifetimes, without a cloud."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest

from workers.cloud import metadata
from workers.cloud.reaping import Action, ReapPolicy, judge
from workers.cloud.servers import Server

NOW = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
POLICY = ReapPolicy(boot_timeout_s=600, idle_timeout_s=300, drain_timeout_s=900, notice_s=120)


def ago(seconds: int) -> datetime.datetime:
    return NOW - datetime.timedelta(seconds=seconds)


def server(name: str = "dispatch-p-1", *, age_s: int = 60, lifetime_s: int = 3600,
           status: str = "ACTIVE", **extra: str) -> Server:
    meta = {**metadata.initial(pool="p", owner="alice", lifetime_s=lifetime_s, now=ago(age_s)),
            **extra}
    return Server(name, name, status, "1", "img", ago(age_s), "10.0.0.5", meta)


@dataclass(frozen=True)
class Node:
    name: str
    online: bool = True
    draining: bool = False
    running: tuple[str, ...] = ()
    last_heartbeat_at: datetime.datetime | None = NOW
    last_job_at: datetime.datetime | None = None
    started_at: datetime.datetime | None = None


def verdict(srv: Server, node: Node | None = None, *, known: bool = True) -> tuple[str, str]:
    nodes = ({node.name: node} if node else {}) if known else None
    found = judge([srv], nodes, NOW, POLICY)
    return (found[0].action.value, found[0].reason) if found else ("", "")


def test_servers_not_created_by_dispatch_are_never_judged() -> None:
    foreign = Server("x", "x", "ERROR", "1", "i", ago(99999), None, {"pool": "p"})
    assert judge([foreign], {}, NOW, POLICY) == []


def test_an_error_server_is_deleted_as_a_failed_boot() -> None:
    [found] = judge([server(status="ERROR")], None, NOW, POLICY)
    assert (found.action, found.failed_boot) == (Action.DELETE, True)


def test_an_expired_server_is_drained_when_its_node_is_online_else_deleted() -> None:
    old = server(age_s=4000)
    assert verdict(old, Node(old.name, running=("j",))) == ("drain", "lifetime ended 6m40s ago")
    assert verdict(old, Node(old.name, online=False))[0] == "delete"
    assert verdict(old, known=False) == ("delete", "lifetime ended 6m40s ago")


def test_a_server_whose_worker_never_registered_is_deleted_after_the_boot_timeout() -> None:
    assert verdict(server(age_s=599)) == ("", "")
    assert verdict(server(age_s=601)) == ("delete", "no worker registered within 10m00s of boot")
    assert verdict(server(age_s=601), known=False) == ("", "")  # no ledger: cannot tell


def test_an_idle_node_is_drained_and_a_busy_one_is_left_alone() -> None:
    srv = server(age_s=1000)
    assert verdict(srv, Node(srv.name, last_job_at=ago(301))) == ("drain", "idle for 5m01s")
    assert verdict(srv, Node(srv.name, last_job_at=ago(100))) == ("", "")
    assert verdict(srv, Node(srv.name, last_job_at=ago(999), running=("j",))) == ("", "")
    assert verdict(srv, Node(srv.name, started_at=ago(400))) == ("drain", "idle for 6m40s")


def test_a_drained_server_is_deleted_once_offline_or_after_the_drain_timeout() -> None:
    drained = server(age_s=2000, drain_requested_at=metadata.stamp(ago(60)),
                     drain_reason="idle for 5m")
    assert verdict(drained, Node(drained.name)) == ("", "")
    assert verdict(drained, Node(drained.name, online=False)) == (
        "delete", "drained (idle for 5m); node is offline")
    late = server(age_s=2000, drain_requested_at=metadata.stamp(ago(901)))
    assert verdict(late, Node(late.name))[1].endswith("drain timeout")


def test_a_node_silent_past_the_boot_timeout_is_deleted() -> None:
    srv = server(age_s=5000, lifetime_s=86400)
    assert verdict(srv, Node(srv.name, online=False, last_heartbeat_at=ago(700))) == (
        "delete", "worker offline for 11m40s")


def test_a_notice_is_given_once_before_the_lifetime_ends() -> None:
    srv = server(age_s=3500, lifetime_s=3600)
    assert verdict(srv, known=False) == ("notice", "lifetime ends in 1m40s")
    warned = server(age_s=3500, lifetime_s=3600, notice_sent_at=metadata.stamp(ago(5)))
    assert verdict(warned, known=False) == ("", "")


def test_extend_moves_the_end_from_the_current_end_or_from_now() -> None:
    meta = metadata.initial(pool="p", owner="a", lifetime_s=3600, now=ago(600))
    updates = metadata.extended(meta, 1800, NOW)
    assert metadata.parse_time(updates[metadata.EXPIRES_AT]) == ago(600) + datetime.timedelta(
        seconds=5400)
    assert updates[metadata.LIFETIME_S] == "5400"
    expired = metadata.initial(pool="p", owner="a", lifetime_s=60, now=ago(600))
    assert metadata.parse_time(metadata.extended(expired, 60, NOW)[metadata.EXPIRES_AT]) == \
        NOW + datetime.timedelta(seconds=60)
    with pytest.raises(ValueError, match="duration must be positive"):
        metadata.extended(meta, 0, NOW)


def test_lifetime_falls_back_to_created_at_plus_lifetime_s() -> None:
    meta = {metadata.CREATED_BY: "dispatch", metadata.CREATED_AT: metadata.stamp(ago(100)),
            metadata.LIFETIME_S: "50"}
    assert metadata.expires_at(meta) == ago(50)
    assert metadata.expires_at({metadata.LIFETIME_S: "soon"}) is None
