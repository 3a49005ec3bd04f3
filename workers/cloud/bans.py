"""Flavors and images that keep failing to boot, banned for a while.

Boot failures (servers in ERROR, or whose worker never registered) are counted per
flavor and per image in a small JSON file under the state directory, locked while
it changes. ``ban_after`` failures within ``ban_for_s`` ban the flavor or image
until the last failure is ``ban_for_s`` old.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
FILE_NAME = "cloud-boot-failures.json"


@dataclass(frozen=True)
class Bans:
    """What is banned now."""

    flavors: frozenset[str]
    images: frozenset[str]


class BootFailures:
    """The boot-failure record in ``state_dir``."""

    def __init__(self, state_dir: Path, *, ban_after: int, ban_for_s: int) -> None:
        self.path = state_dir / FILE_NAME
        self.ban_after = ban_after
        self.ban_for_s = ban_for_s

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            text = handle.read()
            try:
                data = json.loads(text) if text.strip() else {}
            except ValueError:
                log.warning("boot failures file %s is unreadable; starting afresh", self.path)
                data = {}
            data.setdefault("flavor", {})
            data.setdefault("image", {})
            yield data
            handle.seek(0)
            handle.truncate()
            json.dump(data, handle)

    def record(self, *, flavor: str, image: str, now: datetime.datetime) -> None:
        """Count one boot failure of ``flavor`` (a name) and ``image`` (a name or id)."""
        with self._locked() as data:
            for kind, name in (("flavor", flavor), ("image", image)):
                if name:
                    times = self._recent(data[kind].get(name, []), now)
                    data[kind][name] = [*times, now.timestamp()]
                    if len(data[kind][name]) == self.ban_after:
                        log.warning("%s %s: banned for %d s after %d boot failures", kind,
                                    name, self.ban_for_s, self.ban_after)

    def current(self, now: datetime.datetime) -> Bans:
        """Return the flavors and images banned at ``now``."""
        with self._locked() as data:
            banned = {kind: frozenset(name for name, times in data[kind].items()
                                      if len(self._recent(times, now)) >= self.ban_after)
                      for kind in ("flavor", "image")}
        return Bans(flavors=banned["flavor"], images=banned["image"])

    def _recent(self, times: list[float], now: datetime.datetime) -> list[float]:
        return [t for t in times if now.timestamp() - t < self.ban_for_s]
