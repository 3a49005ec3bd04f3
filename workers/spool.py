"""The node's result spool: large archives built on disk, undeliverable results kept.

A job's working directory is zipped into memory while it stays within
``max_result_bytes`` and rolls over to an unnamed file in the spool directory beyond
that, so a large result never sits whole in the node's memory.

A result whose reply comes back unroutable (its reply queue is gone) is kept here for an
operator to fetch: ``<job id>.zip`` (the working directory, as the reply would have
carried it) and ``<job id>.json`` (where the reply was going, its properties and headers,
and why it came back), both mode 0600 in a directory of mode 0700. A second result of the
same job id gets ``<job id>.2.zip`` and so on; nothing is overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from dispatch.archive import zip_directory_to, zip_flat_directory
from dispatch.chunks import Splitter
from workers.running import RunningJob

log = logging.getLogger(__name__)

__all__ = ["Packed", "Spool"]

_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
#: Working directories of plain files up to this size are zipped in one pass, in memory.
FLAT_ZIP_MAX_BYTES = 1 << 20


class Spool:
    """A node's spool directory, and the size above which results leave memory."""

    def __init__(self, root: Path, max_result_bytes: int) -> None:
        if max_result_bytes < 1:
            raise ValueError("max_result_bytes must be positive")
        self.root = root
        self.max_result_bytes = max_result_bytes
        self._ready = False

    def pack(self, job: RunningJob) -> Packed:
        """Zip a finished job's working directory (the job's pidfd is released first)."""
        job.close()
        flat = zip_flat_directory(job.workdir, min(self.max_result_bytes, FLAT_ZIP_MAX_BYTES))
        if flat is not None:
            job.listing = flat.names  # what cleanup removes without listing it again
            return Packed(self, io.BytesIO(flat.data), len(flat.data))
        self._ensure()
        file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115  # Packed closes it
            max_size=self.max_result_bytes, dir=str(self.root))
        try:
            size = zip_directory_to(job.workdir, file)
        except BaseException:
            file.close()
            raise
        return Packed(self, file, size)

    def keep(self, job_id: str, meta: Mapping[str, Any], archive: bytes | IO[bytes], *,
             suffix: str = ".zip") -> Path:
        """Write ``archive`` and ``meta`` (as JSON) under the job's name; return the zip's path.

        Each file is written under a temporary name, synced, then renamed: a ``.json``
        beside a ``.zip`` means both are whole. Raises OSError when they cannot be written.
        ``suffix`` names what the data is (``.zip``, or ``.message`` for a parked message).
        """
        self._ensure()
        stem = _stem(job_id)
        base, n = stem, 1
        while (self.root / f"{base}{suffix}").exists() or (self.root / f"{base}.json").exists():
            n += 1
            base = f"{stem}.{n}"
        data_path = self.root / f"{base}{suffix}"
        _write(data_path, archive)
        key = "zip" if suffix == ".zip" else "data"
        text = json.dumps({**meta, key: data_path.name}, indent=2, sort_keys=True,
                          default=_printable)
        _write(self.root / f"{base}.json", text.encode("utf-8", "surrogateescape"))
        return data_path

    def park(self, job_id: str, message: Any, reason: str) -> Path:
        """Keep a job message that could not be dead-lettered: its body and, as JSON, the rest.

        Written as ``<job id>.message`` (the body, byte for byte) and ``<job id>.json``
        (properties, headers, delivery info and why it is here). Raises OSError when
        they cannot be written.
        """
        body = message.body
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
        meta = {"job_id": job_id, "reason": reason,
                "properties": {k: v for k, v in message.properties.items()
                               if k != "application_headers"},
                "headers": _jsonable(dict(message.headers or {})),
                "delivery_info": {k: message.delivery_info.get(k)
                                  for k in ("exchange", "routing_key", "redelivered")}}
        return self.keep(job_id, meta, raw, suffix=".message")

    def _ensure(self) -> None:
        if self._ready:
            return
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.root.chmod(0o700)
        self._ready = True


class Packed:
    """A job's zipped working directory: in memory when small, in the spool when large."""

    def __init__(self, spool: Spool, file: IO[bytes], size: int) -> None:
        self.spool = spool
        self.file = file
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<Packed {self.size} bytes{' (large)' if self.is_large else ''}>"

    @property
    def is_large(self) -> bool:
        """Tell whether the archive is over ``max_result_bytes`` and must go in chunks."""
        return self.size > self.spool.max_result_bytes

    def body(self) -> bytes:
        """Return the whole archive (for a small one)."""
        self.file.seek(0)
        return self.file.read()

    def splitter(self) -> Splitter:
        """Return a reader of the archive in chunks of ``max_result_bytes``."""
        return Splitter(self.file, self.size, self.spool.max_result_bytes)

    def keep(self, job_id: str, meta: Mapping[str, Any]) -> Path:
        """Keep the archive on the spool (see :meth:`Spool.keep`)."""
        return self.spool.keep(job_id, meta, self.file)

    def close(self) -> None:
        """Free the memory or disk the archive holds."""
        self.file.close()


def _stem(job_id: str) -> str:
    """Return the job id, or a digest of it when it is not a safe file name."""
    if _SAFE_STEM.match(job_id):
        return job_id
    return "job-" + hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _jsonable(value: Any) -> Any:
    """Return ``value`` with every mapping key a string (AMQP table keys may be bytes)."""
    if isinstance(value, dict):
        return {k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k):
                _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _printable(value: Any) -> Any:
    """Return what JSON cannot hold as text (bytes as base64, the rest by ``str``)."""
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    return str(value)


def _write(path: Path, data: bytes | IO[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, _WRITE_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                data.seek(0)
                shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
