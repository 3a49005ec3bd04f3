"""openstacksdk over real HTTP against the OpenStack double, through an explicit clouds.yaml."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cloud_fixtures import IMAGE, old, ours
from openstack_double import PASSWORD, OpenStackDouble

from workers.cloud import metadata
from workers.cloud.bans import BootFailures
from workers.cloud.errors import BannedError, CloudApiError, CloudConfigError, QuotaError
from workers.cloud.flavors import Need
from workers.cloud.provisioner import Order, provision
from workers.cloud.servers import Cloud
from workers.cloud.settings import CloudSettings


@pytest.fixture
def settings(cloud_env: dict[str, str]) -> CloudSettings:
    return CloudSettings.from_env(cloud_env)


@pytest.fixture
def cloud(settings: CloudSettings) -> Cloud:
    assert settings.clouds_yaml is not None
    with Cloud.connect(settings.clouds_yaml, settings.cloud) as c:
        yield c  # type: ignore[misc]


def test_flavors_and_images_are_read_over_http(cloud: Cloud) -> None:
    flavors = {f.name: f for f in cloud.flavors()}
    assert flavors["jt.large"].ephemeral_gb == 10
    assert flavors["me1.small"].is_public is False
    assert flavors["m1.xlarge"].vcpus == 8
    image = cloud.image(IMAGE)
    assert (image.name, image.root_gb) == (IMAGE, 2)
    with pytest.raises(CloudApiError, match="no image named 'nope'"):
        cloud.image("nope")


def test_provision_boots_the_smallest_fitting_flavor_with_dispatch_metadata(
        cloud: Cloud, settings: CloudSettings, cloud_double: OpenStackDouble) -> None:
    servers = provision(cloud, settings, Order(pool="gpu", count=2, need=Need(2, 3000),
                                               lifetime_s=3600))
    assert len(servers) == 2
    for server in servers:
        assert server.name.startswith("dispatch-gpu-")
        assert server.flavor_id == "3"  # m1.medium: 2 cores, 4096 MiB
        meta = cloud_double.by_name(server.name)["metadata"]
        assert meta[metadata.CREATED_BY] == "dispatch"
        assert (meta[metadata.POOL], meta[metadata.OWNER], meta[metadata.LIFETIME_S]) == \
            ("gpu", "alice", "3600")
        created = metadata.parse_time(meta[metadata.CREATED_AT])
        ends = metadata.parse_time(meta[metadata.EXPIRES_AT])
        assert created and ends and ends - created == datetime.timedelta(hours=1)
    assert {s.name for s in cloud.servers()} == {s.name for s in servers}


def test_servers_not_booted_by_dispatch_are_never_listed(cloud: Cloud,
                                                         cloud_double: OpenStackDouble) -> None:
    cloud_double.add_server("someone-elses-vm", metadata={"owner": "bob"})
    cloud_double.add_server("dispatch-default-1", metadata=ours("default", created=old(10),
                                                          lifetime_s=60))
    assert [s.name for s in cloud.servers()] == ["dispatch-default-1"]
    assert len(cloud.servers(ours_only=False)) == 2


def test_quotas_refuse_a_provision_that_would_pass_them(
        cloud: Cloud, cloud_env: dict[str, str], cloud_double: OpenStackDouble) -> None:
    settings = CloudSettings.from_env({**cloud_env, "DISPATCH_CLOUD_MAX_CORES": "5"})
    provision(cloud, settings, Order(pool="p", count=2, need=Need(2)))
    with pytest.raises(QuotaError, match="room for 0"):
        provision(cloud, settings, Order(pool="p", need=Need(2)))
    assert len(cloud_double.calls("POST", r"/servers$")) == 2


def test_a_flavor_that_keeps_failing_to_boot_is_banned_for_the_next_one(
        cloud: Cloud, settings: CloudSettings) -> None:
    failures = BootFailures(settings.state_dir, ban_after=settings.ban_after,
                            ban_for_s=settings.ban_for_s)
    now = datetime.datetime.now(datetime.UTC)
    for _ in range(settings.ban_after):
        failures.record(flavor="m1.tiny", image="", now=now)
    [server] = provision(cloud, settings, Order(pool="p"))
    assert server.flavor_id == "2"  # m1.small, the next smallest
    image = cloud.image(IMAGE)
    for _ in range(settings.ban_after):
        failures.record(flavor="", image=image.id, now=now)
    with pytest.raises(BannedError, match=f"image {IMAGE} is banned"):
        provision(cloud, settings, Order(pool="p"))


def test_delete_reports_a_server_already_gone(cloud: Cloud, cloud_double: OpenStackDouble) -> None:
    server_id = cloud_double.add_server("dispatch-x", metadata={"created-by": "dispatch"})
    assert cloud.delete(server_id) is True
    assert cloud.delete(server_id) is False


def test_metadata_updates_keep_the_other_items(cloud: Cloud, cloud_double: OpenStackDouble) -> None:
    server_id = cloud_double.add_server("dispatch-y",
                                        metadata={"created-by": "dispatch", "pool": "a"})
    cloud.update_metadata(server_id, {"expires_at": "2030-01-01T00:00:00+00:00"})
    assert cloud_double.by_name("dispatch-y")["metadata"] == {
        "created-by": "dispatch", "pool": "a", "expires_at": "2030-01-01T00:00:00+00:00"}


def test_the_clouds_yaml_path_is_explicit_and_cwd_is_never_searched(
        cloud_double: OpenStackDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoy = OpenStackDouble()  # never started: a clouds.yaml in cwd pointing there must not count
    work = tmp_path / "cwd"
    work.mkdir()
    decoy.write_clouds_yaml(work / "clouds.yaml", cloud="double")
    decoy.server.server_close()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OS_AUTH_URL", "http://127.0.0.1:9/identity/v3")
    with pytest.raises(CloudConfigError, match=r"clouds\.yaml not found at"):
        Cloud.connect(tmp_path / "missing.yaml", "double")
    real = cloud_double.write_clouds_yaml(tmp_path / "real.yaml")
    with pytest.raises(CloudConfigError, match="cloud 'other' is not in"):
        Cloud.connect(real, "other")
    with Cloud.connect(real, "double") as cloud:
        assert cloud.flavors()


def test_a_refused_password_is_a_clear_error_that_never_shows_it(
        cloud_double: OpenStackDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = cloud_double.write_clouds_yaml(tmp_path / "clouds.yaml")
    path.write_text(path.read_text().replace(PASSWORD, "wrong-password-123"))
    caplog.set_level(logging.DEBUG)
    with Cloud.connect(path, "double") as cloud, pytest.raises(CloudApiError) as info:
        cloud.flavors()
    assert "listing flavors" in str(info.value)
    assert "wrong-password-123" not in str(info.value)
    assert "wrong-password-123" not in caplog.text


def test_a_pool_server_group_is_made_once_and_hinted_on_every_boot(
        cloud: Cloud, cloud_env: dict[str, str], cloud_double: OpenStackDouble) -> None:
    settings = CloudSettings.from_env({**cloud_env,
                                       "DISPATCH_CLOUD_SERVER_GROUP": "anti-affinity"})
    first = provision(cloud, settings, Order(pool="spread", count=2))
    second = provision(cloud, settings, Order(pool="spread"))
    [group] = cloud_double.state.groups.values()
    assert (group["name"], group["policies"]) == ("dispatch-spread", ["anti-affinity"])
    assert [cloud_double.state.hints[s.id] for s in [*first, *second]] == \
        [{"group": group["id"]}] * 3
