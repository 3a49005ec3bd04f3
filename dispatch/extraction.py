"""Unpacking an untrusted zip: every name checked first, sizes counted, no link followed.

A job's input archive comes from anyone who can publish to a pool. :func:`safe_extract`
checks every member's name before it writes anything (no absolute paths, no ``..``, no
names too long or too deep), skips links, FIFOs and devices, counts the bytes each member
really produces against :class:`ExtractLimits` (total size, member count, compression
ratio: a zip bomb stops at the first member past the ratio), and opens every file relative
to directory descriptors with ``O_NOFOLLOW``, so nothing in the archive can reach outside
the destination.
"""

from __future__ import annotations

import io
import os
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

from dispatch.archive import MAX_DEPTH, MAX_NAME_BYTES, is_zip
from dispatch.errors import ArchiveError

__all__ = ["ExtractLimits", "Extracted", "safe_extract"]

_CHUNK_BYTES = 1 << 16
_RATIO_FLOOR_BYTES = 1 << 20  # the ratio check applies once a member passes this size
_NAME_MAX_BYTES = 255  # one path component
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError)


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what :func:`safe_extract` writes; sizes are counted, never taken from headers."""

    max_total_bytes: int = 2 * 1024**3
    max_files: int = 100_000
    max_ratio: float = 200.0  # uncompressed/compressed, checked for members above 1 MiB
    max_name_bytes: int = MAX_NAME_BYTES


@dataclass(frozen=True)
class Extracted:
    """What :func:`safe_extract` wrote (``names``) and the links or devices it left out."""

    names: tuple[str, ...]
    skipped: tuple[str, ...]


_DEFAULT_LIMITS = ExtractLimits()


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    kind: Literal["file", "dir", "skip"]


def safe_extract(
    data: bytes | BinaryIO, dest: Path, limits: ExtractLimits = _DEFAULT_LIMITS
) -> Extracted:
    """Unpack an untrusted zip into ``dest`` (created if missing), or raise :class:`ArchiveError`.

    Every name is checked before anything is written. If a member turns out too big or corrupt
    while it is copied, that member is removed but earlier ones stay: unpack into a fresh directory.
    """
    with _open_zip(data) as zf:
        members = _plan(zf.infolist(), limits)
        dest.mkdir(parents=True, exist_ok=True)
        chain = _DirChain(dest)
        try:
            return _extract_all(zf, members, chain, limits)
        finally:
            chain.close()


def _open_zip(data: bytes | BinaryIO) -> zipfile.ZipFile:
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        start = stream.tell()
        head = stream.read(4)
        stream.seek(start)
        if not is_zip(head):
            raise ArchiveError("not a zip archive")
        return zipfile.ZipFile(stream)
    except (*_CORRUPT, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from exc


def _plan(infos: list[zipfile.ZipInfo], limits: ExtractLimits) -> list[_Member]:
    """Check every member before anything is written; refuse names that escape or clash."""
    if len(infos) > limits.max_files:
        raise ArchiveError(f"archive has {len(infos)} members, over max_files={limits.max_files}")
    members = [_check_member(info, limits) for info in infos]
    files: dict[tuple[str, ...], str] = {}
    dirs: dict[tuple[str, ...], str] = {}
    for info, parts, kind in members:
        if kind == "skip":
            continue
        if kind == "file":
            if not parts or parts in files:
                raise ArchiveError(f"member {info.filename!r} is empty or a repeated name")
            files[parts] = info.filename
        for depth in range(len(parts) - (kind == "file"), 0, -1):
            if parts[:depth] in dirs:
                break  # so are all its parents
            dirs[parts[:depth]] = info.filename
    clash = sorted(files.keys() & dirs.keys())
    if clash:
        raise ArchiveError(f"member {files[clash[0]]!r} is also a directory in {dirs[clash[0]]!r}")
    return members


def _check_member(info: zipfile.ZipInfo, limits: ExtractLimits) -> _Member:
    """Refuse a member whose name is not plainly relative, or that is encrypted or exotic."""
    name = info.orig_filename  # zipfile cuts ``filename`` at a NUL; this keeps it
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
        raise ArchiveError(f"member {name[:60]!r}... has a name over {limits.max_name_bytes} bytes")
    if "\x00" in name or "\\" in name:
        raise ArchiveError(f"member {name!r} has a NUL or backslash in its name")
    if name.startswith("/") or (name[1:2] == ":" and name[:1].isascii() and name[:1].isalpha()):
        raise ArchiveError(f"member {name!r} has an absolute name")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"member {name!r} has a '..' component")
    if len(parts) > MAX_DEPTH or any(len(part.encode()) > _NAME_MAX_BYTES for part in parts):
        raise ArchiveError(f"member {name!r} is nested too deep or has a component too long")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"member {name!r} is encrypted")
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return _Member(info, parts, "skip")  # symlink, FIFO, socket or device: never created
    if file_type == stat.S_IFDIR or name.endswith("/"):
        return _Member(info, parts, "dir")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArchiveError(f"member {name!r} uses unsupported compression {info.compress_type}")
    return _Member(info, parts, "file")


def _extract_all(
    zf: zipfile.ZipFile, members: list[_Member], chain: _DirChain, limits: ExtractLimits
) -> Extracted:
    names: list[str] = []
    skipped: list[str] = []
    written = [0]  # bytes written so far, across members
    for info, parts, kind in members:
        if kind == "skip":
            skipped.append(info.filename)
        elif kind == "dir":
            chain.enter(parts, info.filename)
            names.extend(["/".join(parts) + "/"] if parts else [])
        else:
            parent = chain.enter(parts[:-1], info.filename)
            fd = _create_file(parent, parts[-1], info)
            try:
                _copy_member(zf, info, fd, limits, written)
            except BaseException:
                os.unlink(parts[-1], dir_fd=parent)
                raise
            finally:
                os.close(fd)
            names.append("/".join(parts))
    return Extracted(tuple(names), tuple(skipped))


def _create_file(parent_fd: int, leaf: str, info: zipfile.ZipInfo) -> int:
    """Open ``leaf`` for writing as a regular file: never through a symlink, never a FIFO."""
    try:
        fd = os.open(leaf, _WRITE_FLAGS, 0o600, dir_fd=parent_fd)
    except OSError as exc:
        msg = f"member {info.filename!r}: cannot create it, a link or device is in the way"
        raise ArchiveError(f"{msg}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArchiveError(f"member {info.filename!r}: something other than a file is in the way")
    os.ftruncate(fd, 0)
    os.fchmod(fd, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
    return fd


def _copy_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, fd: int, limits: ExtractLimits, written: list[int]
) -> None:
    """Copy one member, counting the bytes it really produces against the limits."""
    name, total, size = info.filename, limits.max_total_bytes, 0
    ratio_cap = limits.max_ratio * max(info.compress_size, 1)
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK_BYTES):
                size += len(chunk)
                written[0] += len(chunk)
                if written[0] > total:
                    raise ArchiveError(f"member {name!r}: archive unpacks past {total} bytes")
                if size > _RATIO_FLOOR_BYTES and size > ratio_cap:
                    raise ArchiveError(f"member {name!r}: expands over {limits.max_ratio}x")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    except _CORRUPT as exc:
        raise ArchiveError(f"member {name!r} is corrupt: {exc}") from exc
    mtime = time.mktime((*info.date_time, 0, 0, -1))
    os.utime(fd, (mtime, mtime))


class _DirChain:
    """Descriptors from ``dest`` down to the directory last entered, opened without following."""

    def __init__(self, dest: Path) -> None:
        self._parts: list[str] = []
        self._fds = [os.open(dest, _DIR_FLAGS)]

    def enter(self, parts: tuple[str, ...], member: str) -> int:
        common = 0
        while common < min(len(parts), len(self._parts)) and parts[common] == self._parts[common]:
            common += 1
        while len(self._parts) > common:
            self._parts.pop()
            os.close(self._fds.pop())
        for part in parts[common:]:
            try:
                self._fds.append(_open_subdir(self._fds[-1], part))
            except OSError as exc:
                where = "/".join([*self._parts, part])
                msg = f"member {member!r}: {where!r} in dest is not a directory: {exc.strerror}"
                raise ArchiveError(msg) from exc
            self._parts.append(part)
        return self._fds[-1]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def _open_subdir(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    os.fchmod(fd, 0o755)
    return fd
