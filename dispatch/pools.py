"""The pools file of ``dispatch ledger --pools``: where a pool's jobs go when it has no node.

A YAML mapping with ``pools``; each pool names its fallback pools by job kind, in the
order they are tried (the thesis's ``preferred_jobs``: ``mpi``, ``serial``, ``smp``)::

    defaults: {fallback_after: 30s}
    pools:
      cluster-a:
        fallback_after: 2m
        fallbacks: {mpi: [cluster-b], serial: [cluster-c, cluster-b], smp: [cluster-c]}
      cluster-b:
        fallbacks: {mpi: [cluster-a]}

A job's kind comes from its headers (:func:`job_kind`): ``mpi`` when it asks for more
than one node, ``smp`` when it asks for more than one core, ``serial`` otherwise.
Every mistake is one line naming the file and the field
(``pools.yaml: pools.cluster-a.fallbacks.gpu: unknown job kind (use mpi, serial or smp)``).
Pure: no I/O beyond reading the file, no kombu.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch import headers
from dispatch.errors import DispatchError, InvalidMessageError
from dispatch.quantity import parse_duration_s
from dispatch.topology import check_pool_name
from dispatch.yamlfile import read_yaml

__all__ = ["DEFAULT_FALLBACK_AFTER_S", "JOB_KINDS", "MPI", "SERIAL", "SMP", "PoolPolicy",
           "PoolsFileError", "job_kind", "load_pools", "parse_pools"]

MPI, SERIAL, SMP = "mpi", "serial", "smp"
JOB_KINDS = (MPI, SERIAL, SMP)
DEFAULT_FALLBACK_AFTER_S = 30.0
_TOP = frozenset({"pools", "defaults"})
_POOL_FIELDS = frozenset({"fallback_after", "fallbacks"})


class PoolsFileError(DispatchError):
    """Raised when a pools file cannot be read or breaks its format (the operator's fault)."""


@dataclass(frozen=True)
class PoolPolicy:
    """What happens to a pool's waiting jobs while it has no live node."""

    pool: str
    fallback_after_s: float = DEFAULT_FALLBACK_AFTER_S
    #: Job kind -> fallback pools, tried in order; a kind not listed never falls back.
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def fallbacks_for(self, kind: str) -> tuple[str, ...]:
        """Return the fallback pools of ``kind`` jobs, in the order they are tried."""
        return self.fallbacks.get(kind, ())

    def all_pools(self) -> set[str]:
        """Return this pool and every pool it may send jobs to."""
        return {self.pool, *(p for pools in self.fallbacks.values() for p in pools)}


def load_pools(path: Path) -> dict[str, PoolPolicy]:
    """Read and check the pools file at ``path``; raise PoolsFileError naming the field."""
    data = read_yaml(path, PoolsFileError)
    return parse_pools(data, source=str(path))


def parse_pools(data: object, *, source: str = "pools file") -> dict[str, PoolPolicy]:
    """Check an already loaded pools file; return each pool's policy by name."""
    def fail(where: str, why: str) -> PoolsFileError:
        return PoolsFileError(f"{source}: {where}: {why}" if where else f"{source}: {why}")

    if not isinstance(data, Mapping):
        raise fail("", "must be a mapping with a 'pools' mapping")
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise fail(unknown[0], f"unknown field (expected one of {', '.join(sorted(_TOP))})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(map(str, defaults)) - {"fallback_after"}:
        raise fail("defaults", "must be a mapping with only fallback_after")
    default_after = _after(defaults.get("fallback_after", DEFAULT_FALLBACK_AFTER_S),
                           "defaults.fallback_after", fail)
    entries = data.get("pools")
    if not isinstance(entries, Mapping) or not entries:
        raise fail("pools", "must be a non-empty mapping of pool names")
    out: dict[str, PoolPolicy] = {}
    for name, entry in entries.items():
        where = f"pools.{name}"
        try:
            check_pool_name(str(name))
        except ValueError as exc:
            raise fail(where, str(exc)) from None
        out[str(name)] = _policy(str(name), entry or {}, default_after, where, fail)
    return out


def _policy(name: str, entry: object, default_after: float, where: str,
            fail: Any) -> PoolPolicy:
    if not isinstance(entry, Mapping):
        raise fail(where, "must be a mapping (fallback_after, fallbacks)")
    unknown = sorted(set(map(str, entry)) - _POOL_FIELDS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}",
                   f"unknown field (expected one of {', '.join(sorted(_POOL_FIELDS))})")
    after = _after(entry.get("fallback_after", default_after), f"{where}.fallback_after", fail)
    kinds = entry.get("fallbacks") or {}
    if not isinstance(kinds, Mapping):
        raise fail(f"{where}.fallbacks", "must map job kinds (mpi, serial, smp) to pool lists")
    fallbacks: dict[str, tuple[str, ...]] = {}
    for kind, listed in kinds.items():
        at = f"{where}.fallbacks.{kind}"
        if kind not in JOB_KINDS:
            raise fail(at, "unknown job kind (use mpi, serial or smp)")
        pools = [listed] if isinstance(listed, str) else listed
        if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
            raise fail(at, "must be a list of pool names")
        for i, pool in enumerate(pools):
            try:
                check_pool_name(pool)
            except ValueError as exc:
                raise fail(f"{at}[{i}]", str(exc)) from None
            if pool == name:
                raise fail(f"{at}[{i}]", "a pool cannot be its own fallback")
        if len(set(pools)) != len(pools):
            raise fail(at, "names a pool twice")
        fallbacks[str(kind)] = tuple(pools)
    return PoolPolicy(name, after, fallbacks)


def _after(value: object, where: str, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise fail(where, f"must be a duration such as 30s or 2m, not {value!r}")
    try:
        seconds = parse_duration_s(value)
    except ValueError as exc:
        raise fail(where, str(exc)) from None
    if seconds <= 0:
        raise fail(where, "must be longer than 0")
    return float(seconds)


def job_kind(raw_headers: Mapping[str, Any]) -> str:
    """Return a job message's kind: ``mpi`` (more than one node), ``smp`` (cores), ``serial``.

    Lenient: a header that cannot be read counts as absent (the node judges the job).
    """
    try:
        hdrs, _ = headers.normalize(raw_headers)
    except InvalidMessageError:
        return SERIAL
    if max(_count(hdrs.get(headers.MIN_NODES)), _count(hdrs.get(headers.MAX_NODES))) > 1:
        return MPI
    if _count(hdrs.get(headers.REQUEST_CPUS)) > 1:
        return SMP
    return SERIAL


def _count(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdecimal():
        return int(value.strip()[:12])
    return 0
