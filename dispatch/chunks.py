"""Large results as ordered chunks: split an archive, put it back together, check it.

A result whose zip is larger than ``max_result_bytes`` travels as chunk messages (no
``JobState``: listeners that only know replies skip them) followed by the job's one
ordinary final reply, whose body is empty and whose headers add the size, SHA-256 and
chunk count of the whole archive. The receiver appends chunks to a file as they come and
checks the whole against that summary before it hands the result out.

No broker here: files and header dictionaries only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from dispatch import headers
from dispatch.errors import ArchiveError, InvalidMessageError
from dispatch.job import JobUpdate

__all__ = ["DEFAULT_MAX_RESULT_BYTES", "ChunkError", "ChunkPlace", "Gatherer", "Reassembly",
           "Splitter", "Summary", "part_name"]

#: Largest archive sent as one reply; larger ones go in chunks of this size. RabbitMQ 4.x
#: refuses messages over 16 MiB by default (3.10: 128 MiB).
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024
#: The body of a chunk message is a piece of a zip, not a zip.
CHUNK_CONTENT_TYPE = "application/octet-stream"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ChunkError(ArchiveError):
    """Raised when a chunked result cannot be put back together.

    A chunk is missing or out of order, the chunk headers are malformed, or the whole
    has the wrong size or SHA-256.
    """


@dataclass(frozen=True)
class ChunkPlace:
    """Where one chunk sits: its index among ``count`` chunks and its byte offset."""

    index: int
    count: int
    offset: int

    def to_headers(self, job_id: str, attempt: int, *, quoted: bool = False) -> dict[str, Any]:
        """Return the headers of this chunk's message (``quoted``: ClassAd-quote the job id)."""
        return {headers.JOB_ID: headers.quote(job_id) if quoted else job_id,
                headers.ATTEMPT: attempt, headers.RESULT_CHUNK: self.index,
                headers.RESULT_CHUNKS: self.count, headers.RESULT_OFFSET: self.offset}

    @classmethod
    def from_headers(cls, h: Mapping[str, Any]) -> ChunkPlace:
        """Read a chunk's place from unquoted headers; raise ChunkError naming a bad one."""
        index = _count(h, headers.RESULT_CHUNK)
        count = _count(h, headers.RESULT_CHUNKS)
        offset = _count(h, headers.RESULT_OFFSET)
        if index >= count:
            raise ChunkError(f"{headers.RESULT_CHUNK} {index} is not below "
                             f"{headers.RESULT_CHUNKS} {count}")
        return cls(index, count, offset)


@dataclass(frozen=True)
class Summary:
    """What the final reply of a chunked result says of the whole archive."""

    size_bytes: int
    sha256: str
    chunks: int

    def to_headers(self) -> dict[str, Any]:
        """Return the headers the final reply adds."""
        return {headers.RESULT_BYTES: self.size_bytes, headers.RESULT_SHA256: self.sha256,
                headers.RESULT_CHUNKS: self.chunks}

    @classmethod
    def from_headers(cls, h: Mapping[str, Any]) -> Summary | None:
        """Return the summary of a final reply's unquoted headers; None for a plain reply."""
        if headers.RESULT_BYTES not in h:
            return None
        sha = h.get(headers.RESULT_SHA256)
        if not isinstance(sha, str) or not _SHA256_HEX.match(sha):
            raise ChunkError(f"{headers.RESULT_SHA256} is not 64 lower-case hex digits")
        return cls(_count(h, headers.RESULT_BYTES), sha, _count(h, headers.RESULT_CHUNKS))


def _count(h: Mapping[str, Any], name: str) -> int:
    value = h.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChunkError(f"{name} is missing or not a count: {value!r}")
    return value


def chunk_count(size_bytes: int, chunk_bytes: int) -> int:
    """Return how many chunks of ``chunk_bytes`` carry ``size_bytes`` (at least one)."""
    return max(1, -(-size_bytes // chunk_bytes))


class Splitter:
    """Reads an archive file chunk by chunk, hashing it on the way."""

    def __init__(self, file: IO[bytes], size_bytes: int, chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.file = file
        self.size_bytes = size_bytes
        self.chunk_bytes = chunk_bytes
        self.count = chunk_count(size_bytes, chunk_bytes)
        self._next = 0
        self._sha = hashlib.sha256()
        file.seek(0)

    def next(self) -> tuple[ChunkPlace, bytes] | None:
        """Return the next chunk and its place, or None once every chunk was read."""
        if self._next >= self.count:
            return None
        offset = self._next * self.chunk_bytes
        data = self.file.read(min(self.chunk_bytes, self.size_bytes - offset))
        if len(data) != min(self.chunk_bytes, self.size_bytes - offset):
            raise ChunkError(f"the archive file ended at byte {offset + len(data)}, "
                             f"before its {self.size_bytes} bytes")
        self._sha.update(data)
        place = ChunkPlace(self._next, self.count, offset)
        self._next += 1
        return place, data

    def summary(self) -> Summary:
        """Return the whole archive's summary, once every chunk was read."""
        if self._next < self.count:
            raise ValueError(f"only {self._next} of {self.count} chunks were read")
        return Summary(self.size_bytes, self._sha.hexdigest(), self.count)


def part_name(job_id: str, attempt: int) -> str:
    """Return the file name a job attempt's chunks are gathered in (safe for any job id)."""
    safe = job_id if _SAFE_NAME.match(job_id) else hashlib.sha256(job_id.encode()).hexdigest()
    return f"{safe}.{attempt}.part"


class Reassembly:
    """A chunked result gathered in the file ``path``, chunk after chunk, in order.

    Nothing is kept in memory between chunks, so a receiver that restarts carries on where
    the file ends: a chunk already in the file is skipped, a chunk 0 starts again (another
    run of the same attempt), and a chunk past the end means one went missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def received_bytes(self) -> int:
        """Return how many bytes arrived so far."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def add(self, place: ChunkPlace, data: bytes) -> bool:
        """Append one chunk; return False when it was already there.

        Raises ChunkError when chunks before it are missing.
        """
        have = 0 if place.index == 0 else self.received_bytes
        if place.offset < have:
            return False
        if place.offset > have:
            raise ChunkError(f"chunk {place.index} of {place.count} starts at byte "
                             f"{place.offset} but only {have} bytes came before it: "
                             "a chunk before it is missing")
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= os.O_TRUNC if have == 0 else 0
        fd = os.open(self.path, flags, 0o600)
        try:
            os.lseek(fd, have, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, have + len(data))
        finally:
            os.close(fd)
        return True

    def finish(self, summary: Summary) -> bytes:
        """Return the whole archive once it checks out against ``summary``.

        Raises ChunkError naming what is wrong: missing bytes, extra bytes, or a SHA-256
        that differs (a chunk was altered).
        """
        have = self.received_bytes
        if have != summary.size_bytes:
            what = "chunks are missing" if have < summary.size_bytes else "there are extra bytes"
            raise ChunkError(f"{have} of {summary.size_bytes} bytes arrived in "
                             f"{summary.chunks} chunks: {what}")
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != summary.sha256:
            raise ChunkError(f"the {have} bytes reassembled have SHA-256 {digest}, "
                             f"not {summary.sha256} as sent: a chunk was altered")
        return data

    def discard(self) -> None:
        """Remove the file (the result was handed out, or refused)."""
        self.path.unlink(missing_ok=True)


class Gatherer:
    """The receiving end: each chunked result gathered in its own file under ``root``.

    Files are named by job id and attempt, so a receiver started again over the same
    ``root`` (the same reply queue) carries on with them. A result found broken (a chunk
    missing) is remembered until its final reply comes, which is then refused. ``root``
    must be a private directory of this user (mode 0700, made if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._broken: dict[Path, ChunkError] = {}
        self._root_checked = False

    def path(self, job_id: str, attempt: int) -> Path:
        """Return the file a job attempt's chunks are gathered in."""
        return self.root / part_name(job_id, attempt)

    def add(self, raw_headers: Mapping[str, Any], body: bytes,
            current_attempt: Mapping[str, int]) -> str:
        """Store one chunk message; return its job id.

        Chunks of attempts older than ``current_attempt[job_id]`` are ignored. Raises
        ChunkError when the chunk's headers are malformed (drop it) and OSError when it
        cannot be stored (keep it queued).
        """
        try:
            hdrs, _ = headers.normalize(raw_headers)
            place = ChunkPlace.from_headers(hdrs)
            job_id, attempt = str(hdrs[headers.JOB_ID]), int(hdrs.get(headers.ATTEMPT, 1))
        except (ChunkError, InvalidMessageError, KeyError, TypeError, ValueError) as exc:
            raise ChunkError(f"a malformed result chunk: {exc}") from None
        path = self.path(job_id, attempt)
        if attempt < current_attempt.get(job_id, 0):
            return job_id
        self._check_root()
        if place.index == 0 or path not in self._broken:
            self._broken.pop(path, None)
            try:
                Reassembly(path).add(place, body)
            except ChunkError as exc:
                self._broken[path] = exc
                Reassembly(path).discard()
        return job_id

    def finish(self, update: JobUpdate) -> JobUpdate:
        """Return the final reply of a chunked result with its whole archive, once checked.

        Raises ChunkError naming the job and what is wrong.
        """
        path = self.path(update.job_id, update.attempt)
        try:
            broken = self._broken.pop(path, None)
            if broken is not None:
                raise broken
            summary = Summary.from_headers(update.headers)
            if summary is None:
                raise ChunkError(f"{headers.RESULT_BYTES} is missing")
            return replace(update, archive=Reassembly(path).finish(summary))
        except ChunkError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot read its chunks in {path}: {exc.strerror}"
        raise ChunkError(f"job {update.job_id}: result refused: {problem}")

    def _check_root(self) -> None:
        """Make ``root`` if missing; refuse one that is a link or open to other users."""
        if self._root_checked:
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(errno.EPERM, "not a private directory of this user (0700)",
                                  str(self.root))
        self._root_checked = True

    def discard(self, job_id: str, attempt: int) -> None:
        """Remove a job attempt's file once its result was handed out or refused."""
        Reassembly(self.path(job_id, attempt)).discard()
