"""Flavor matching: the smallest OpenStack flavor that meets a request and an image. Pure.

A request asks for cores, memory (MiB) and scratch disk (MiB, the flavor's ephemeral
disk). The image adds its own floor: ``min_ram`` (MiB), ``min_disk`` (GiB) and its
size, which must fit the flavor's root disk. Of the flavors that meet or exceed all
of that, the smallest wins: least RAM, then fewest vCPUs, then least ephemeral and
root disk, then name. When none fits, :class:`NoFlavorError` names the closest
flavors and what each lacks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from workers.cloud.errors import NoFlavorError

GIB = 1024**3
CLOSEST_SHOWN = 3


@dataclass(frozen=True)
class Flavor:
    """An OpenStack flavor: a fixed bundle of vCPUs, RAM (MiB) and disks (GiB)."""

    id: str
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    ephemeral_gb: int = 0
    is_public: bool = True

    def size_key(self) -> tuple[int, int, int, int, str]:
        """Return the key that orders flavors from smallest to largest."""
        return (self.ram_mb, self.vcpus, self.ephemeral_gb, self.disk_gb, self.name)


@dataclass(frozen=True)
class Image:
    """What an image demands of a flavor: Glance's ``min_ram``, ``min_disk`` and size."""

    id: str
    name: str
    min_ram_mb: int = 0
    min_disk_gb: int = 0
    size_bytes: int = 0

    @property
    def root_gb(self) -> int:
        """Return the root disk (GiB) this image needs: min_disk or its size, whichever is more."""
        return max(self.min_disk_gb, math.ceil(self.size_bytes / GIB))


@dataclass(frozen=True)
class Need:
    """What a node must offer: cores, memory and scratch disk in MiB."""

    cpus: int = 1
    memory_mb: int = 0
    scratch_mb: int = 0

    def __post_init__(self) -> None:
        for field, value in (("cpus", self.cpus), ("memory_mb", self.memory_mb),
                             ("scratch_mb", self.scratch_mb)):
            if value < 0:
                raise ValueError(f"{field} must not be negative, got {value}")


def shortfalls(flavor: Flavor, need: Need, image: Image | None = None) -> list[str]:
    """Return what ``flavor`` lacks for ``need`` on ``image``, one phrase each; empty if it fits."""
    ram_mb = max(need.memory_mb, image.min_ram_mb if image else 0)
    root_gb = image.root_gb if image else 0
    scratch_gb = math.ceil(need.scratch_mb / 1024)
    lacks = []
    if flavor.vcpus < need.cpus:
        lacks.append(f"vCPUs {flavor.vcpus} < {need.cpus}")
    if flavor.ram_mb < ram_mb:
        lacks.append(f"RAM {flavor.ram_mb} MiB < {ram_mb} MiB")
    if flavor.ephemeral_gb < scratch_gb:
        lacks.append(f"ephemeral disk {flavor.ephemeral_gb} GiB < {scratch_gb} GiB")
    if flavor.disk_gb < root_gb:
        lacks.append(f"root disk {flavor.disk_gb} GiB < {root_gb} GiB for image "
                     f"{image.name if image else ''}")
    return lacks


def pick(flavors: Iterable[Flavor], need: Need, image: Image | None = None, *,
         excluded: frozenset[str] = frozenset()) -> Flavor:
    """Return the smallest flavor meeting ``need`` and ``image``; raise NoFlavorError if none.

    ``excluded`` holds names of flavors not to use (banned after boot failures).
    """
    candidates = [f for f in flavors if f.name not in excluded]
    fitting = [f for f in candidates if not shortfalls(f, need, image)]
    if fitting:
        return min(fitting, key=Flavor.size_key)
    raise NoFlavorError(_no_fit_message(candidates, need, image, excluded))


def _no_fit_message(candidates: list[Flavor], need: Need, image: Image | None,
                    excluded: frozenset[str]) -> str:
    wanted = f"{need.cpus} cores, {need.memory_mb} MiB RAM, {need.scratch_mb} MiB scratch"
    if image is not None:
        wanted += f" on image {image.name}"
    if not candidates:
        suffix = f" ({len(excluded)} banned)" if excluded else ""
        return f"no flavor meets {wanted}: the cloud offers no usable flavor{suffix}"
    ranked = sorted(candidates, key=lambda f: (_distance(f, need, image), f.size_key()))
    closest = "; ".join(f"{f.name} ({', '.join(shortfalls(f, need, image))})"
                        for f in ranked[:CLOSEST_SHOWN])
    return f"no flavor meets {wanted}; closest: {closest}"


def _distance(flavor: Flavor, need: Need, image: Image | None) -> float:
    """Return how far ``flavor`` is from fitting: the sum of its relative shortfalls."""
    ram_mb = max(need.memory_mb, image.min_ram_mb if image else 0)
    pairs = ((flavor.vcpus, need.cpus), (flavor.ram_mb, ram_mb),
             (flavor.ephemeral_gb, math.ceil(need.scratch_mb / 1024)),
             (flavor.disk_gb, image.root_gb if image else 0))
    return sum((want - have) / want for have, want in pairs if want > have)
