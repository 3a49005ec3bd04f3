"""Flavor matching on the CANFAR seed's flavor list (pure, no cloud)."""

from __future__ import annotations

import pytest

from workers.cloud.errors import NoFlavorError
from workers.cloud.flavors import Flavor, Image, Need, pick

# `nova flavor-list` from the CANFAR OpenStack notes.
CANFAR = [
    Flavor("1", "m1.tiny", 1, 512, 5, 0),
    Flavor("2", "m1.small", 2, 2048, 20, 0),
    Flavor("3", "m1.medium", 2, 4096, 40, 0),
    Flavor("4", "m1.large", 4, 8192, 80, 0),
    Flavor("5", "m1.xlarge", 8, 16384, 160, 0),
    Flavor("5d234569", "jt.large", 4, 16384, 10, 10),
    Flavor("db9e8d81", "me1.small", 2, 2048, 20, 20, is_public=False),
]
SL5 = Image("40ad960b", "vm_partitioned_sl5_console", size_bytes=10737418240)
SNAPSHOT = Image("c530476e", "canfar_work_snapshot", min_disk_gb=20)


@pytest.mark.parametrize(("need", "image", "expected"), [
    (Need(), None, "m1.tiny"),
    (Need(cpus=1, memory_mb=512), None, "m1.tiny"),
    (Need(cpus=1, memory_mb=513), None, "m1.small"),
    (Need(cpus=2, memory_mb=3000), None, "m1.medium"),
    (Need(cpus=3), None, "m1.large"),
    (Need(cpus=8, memory_mb=9000), None, "m1.xlarge"),
    (Need(cpus=1, scratch_mb=1), None, "me1.small"),
    (Need(cpus=1, scratch_mb=20 * 1024), None, "me1.small"),
    (Need(cpus=3, scratch_mb=1024), None, "jt.large"),
    (Need(cpus=1), SL5, "m1.small"),
    (Need(cpus=1), SNAPSHOT, "m1.small"),
    (Need(cpus=1, scratch_mb=1024), SL5, "me1.small"),
])
def test_the_smallest_flavor_meeting_cores_ram_scratch_and_image_is_picked(
        need: Need, image: Image | None, expected: str) -> None:
    assert pick(CANFAR, need, image).name == expected


def test_the_image_min_ram_raises_the_memory_floor() -> None:
    image = Image("i", "big-ram", min_ram_mb=5000)
    assert pick(CANFAR, Need(cpus=1, memory_mb=100), image).name == "m1.large"


def test_ties_are_broken_by_ram_then_vcpus() -> None:
    flavors = [Flavor("a", "wide", 4, 4096, 20), Flavor("b", "tall", 2, 8192, 20),
               Flavor("c", "narrow", 2, 4096, 20)]
    assert pick(flavors, Need(cpus=2, memory_mb=4096)).name == "narrow"
    assert pick(flavors, Need(cpus=3, memory_mb=1)).name == "wide"


def test_banned_flavors_are_skipped_for_the_next_smallest() -> None:
    assert pick(CANFAR, Need(), excluded=frozenset({"m1.tiny"})).name == "m1.small"


def test_no_fit_names_the_closest_flavors_and_what_they_lack() -> None:
    with pytest.raises(NoFlavorError) as info:
        pick(CANFAR, Need(cpus=8, memory_mb=16384, scratch_mb=10 * 1024))
    text = str(info.value)
    assert "no flavor meets 8 cores, 16384 MiB RAM, 10240 MiB scratch" in text
    assert "closest: " in text
    closest = text.split("closest: ")[1]
    assert closest.startswith(("m1.xlarge (ephemeral disk 0 GiB < 10 GiB)",
                               "jt.large (vCPUs 4 < 8)"))
    assert "m1.tiny" not in closest


def test_an_image_too_big_for_every_root_disk_is_named_in_the_error() -> None:
    huge = Image("h", "huge-image", size_bytes=500 * 1024**3)
    with pytest.raises(NoFlavorError, match=r"root disk 160 GiB < 500 GiB for image huge-image"):
        pick(CANFAR, Need(), huge)


def test_an_empty_or_fully_banned_list_says_so() -> None:
    with pytest.raises(NoFlavorError, match="offers no usable flavor"):
        pick([], Need())
    with pytest.raises(NoFlavorError, match=r"\(7 banned\)"):
        pick(CANFAR, Need(), excluded=frozenset(f.name for f in CANFAR))


def test_negative_requests_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="memory_mb must not be negative"):
        Need(memory_mb=-1)
