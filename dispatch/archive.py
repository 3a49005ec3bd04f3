"""Zip archives: job directories and inputs packed without following links.

Packing runs as root over a directory an unprivileged job controlled, so it never follows a
symlink and never opens anything but a regular file. Unpacking, which trusts nothing in the
archive, is :mod:`dispatch.extraction`.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NamedTuple

from dispatch.errors import ArchiveError

__all__ = ["MAX_DEPTH", "MAX_NAME_BYTES", "ZIP_CONTENT_TYPE", "FlatZip", "is_zip", "zip_directory",
           "zip_flat_directory", "zip_paths"]

logger = logging.getLogger(__name__)

ZIP_CONTENT_TYPE = "application/zip"

_SMALL_FILE_BYTES = 4096  # smaller files are stored, larger ones deflated at level 1
_CHUNK_BYTES = 1 << 16
MAX_DEPTH = 256  # deeper directories are skipped when packing and refused when unpacking
#: The longest member name: longer ones are left out when packing, refused when unpacking.
MAX_NAME_BYTES = 4096
_DOS_EPOCH = (1980, 1, 1, 0, 0, 0)
_DOS_END = (2107, 12, 31, 23, 59, 58)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def is_zip(data: bytes) -> bool:
    """Return whether ``data`` starts like a zip archive (a local header, or an empty archive)."""
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def zip_directory(root: Path) -> bytes:
    """Zip the whole tree under ``root`` (itself not a symlink), names relative to it, sorted.

    Only directories and regular files go in; symlinks, FIFOs, sockets, devices and files that
    vanish or cannot be read are skipped (logged at debug level).
    """
    buf = io.BytesIO()
    zip_directory_to(root, buf)
    return buf.getvalue()


def zip_directory_to(root: Path, out: IO[bytes]) -> int:
    """Zip the tree under ``root`` like :func:`zip_directory`, into the seekable file ``out``.

    For archives too big to build in memory; returns the archive's size in bytes.
    """
    try:
        fd = os.open(root, _DIR_FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        raise ArchiveError(f"cannot zip {root}: {exc.strerror}") from exc
    start = out.tell()
    try:
        with zipfile.ZipFile(out, "w") as zf:
            _add_tree(zf, fd, "", 0)
    finally:
        os.close(fd)
    out.seek(0, os.SEEK_END)
    return out.tell() - start


class FlatZip(NamedTuple):
    """A directory of plain files zipped in one pass: the archive and every name it held."""

    data: bytes
    names: tuple[str, ...]


#: Most files the one-pass writer takes; a directory with more goes through zipfile.
_FLAT_MAX_FILES = 256
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_VERSION = 20  # 2.0: deflate, no zip64
_MADE_BY = 3 << 8 | _VERSION  # Unix, so the external attributes carry the mode
_UTF8_FLAG = 0x800


def zip_flat_directory(root: Path, max_bytes: int) -> FlatZip | None:
    """Zip ``root`` in one pass when it holds only plain files, at most ``max_bytes`` of them.

    The archive is what :func:`zip_directory` makes of such a directory (same names,
    order, modes, times, storing and deflating), written directly rather than through
    ``zipfile``: a job's usual working directory (its output and error files) costs a
    fraction of the time. Returns None, having written nothing, when the directory holds a
    subdirectory, more than a few hundred entries or more than ``max_bytes``: use
    :func:`zip_directory_to` then. Links and special files are left out, as there.

    Files are opened by path with ``O_NOFOLLOW``; ``root`` itself must be a directory the
    job cannot replace (the node's working directories sit in a root only it may write).
    """
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda entry: entry.name)
    except OSError as exc:
        raise ArchiveError(f"cannot zip {root}: {exc.strerror}") from exc
    if len(entries) > _FLAT_MAX_FILES:
        return None
    local: list[bytes] = []
    central: list[bytes] = []
    offset = total = 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            return None
        packed = _flat_member(entry, offset)
        if packed is None:
            continue
        head, body, record, size = packed
        total += size
        if total > max_bytes:
            return None
        local += (head, body)
        central.append(record)
        offset += len(head) + len(body)
    directory = b"".join(central)
    end = _END.pack(0x06054B50, 0, 0, len(central), len(central), len(directory), offset, 0)
    return FlatZip(b"".join(local) + directory + end, tuple(e.name for e in entries))


def _flat_member(entry: os.DirEntry[str], offset: int) -> tuple[bytes, bytes, bytes, int] | None:
    """Return one file's local header, data, central record and size; None to leave it out."""
    try:
        name = entry.name.encode("ascii")
        flags = 0
    except UnicodeEncodeError:
        try:
            name = entry.name.encode("utf-8")
        except UnicodeEncodeError:  # not UTF-8 on disk: as zip_directory, left out
            logger.debug("archive: skipped %r: name is not UTF-8", entry.name)
            return None
        flags = _UTF8_FLAG
    if len(name) + 1 > MAX_NAME_BYTES or not entry.is_file(follow_symlinks=False):
        logger.debug("archive: skipped %r: a link, a special file, or too long", entry.name)
        return None
    try:
        fd = os.open(entry.path, _READ_FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        logger.debug("archive: skipped %r: %s", entry.name, exc)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        data = _read_exactly(fd, st.st_size)
    except OSError as exc:
        logger.debug("archive: skipped %r: %s", entry.name, exc)
        return None
    finally:
        os.close(fd)
    crc = zlib.crc32(data)
    if len(data) < _SMALL_FILE_BYTES:
        method, stored = 0, data
    else:
        packer = zlib.compressobj(1, zlib.DEFLATED, -15)
        method, stored = 8, packer.compress(data) + packer.flush()
    y, mo, d, h, mi, sec = _dos_time(st.st_mtime)
    dos_time = h << 11 | mi << 5 | sec // 2
    dos_date = (y - 1980) << 9 | mo << 5 | d
    mode = stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)
    head = _LOCAL.pack(0x04034B50, _VERSION, flags, method, dos_time, dos_date, crc,
                       len(stored), len(data), len(name), 0) + name
    record = _CENTRAL.pack(0x02014B50, _MADE_BY, _VERSION, flags, method, dos_time, dos_date,
                           crc, len(stored), len(data), len(name), 0, 0, 0, 0, mode << 16,
                           offset) + name
    return head, stored, record, len(data)


def _read_exactly(fd: int, size: int) -> bytes:
    """Read at most ``size`` bytes (what the file had when opened), fewer if it shrank."""
    if size == 0:
        return b""
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    parts = [data]
    left = size - len(data)
    while left > 0 and (chunk := os.read(fd, min(_CHUNK_BYTES, left))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def zip_paths(paths: Sequence[Path]) -> bytes:
    """Zip input files and directories, each at the top level under its own name.

    A symlink named here is followed (it means its target); symlinks below a directory are not.
    """
    named: dict[str, tuple[Path, bool]] = {}
    for path in paths:
        name = path.name if path.name not in ("", "..") else Path(os.path.abspath(path)).name
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ArchiveError(f"input {path}: {exc.strerror}") from exc
        if not name or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ArchiveError(f"input {path} is not a named regular file or directory")
        if name in named:
            raise ArchiveError(f"inputs {named[name][0]} and {path} would both be named {name!r}")
        named[name] = (path, stat.S_ISDIR(mode))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (path, is_dir) in named.items():
            try:
                if is_dir:
                    _add_dir(zf, None, str(path), name, 0, follow=True)
                elif not _add_file(zf, None, str(path), name, follow=True):
                    raise ArchiveError(f"input {path} is no longer a regular file")
            except OSError as exc:
                raise ArchiveError(f"input {path}: {exc.strerror}") from exc
    return buf.getvalue()


# --- packing -------------------------------------------------------------------------------


def _add_tree(zf: zipfile.ZipFile, dir_fd: int, prefix: str, depth: int) -> None:
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        arcname = prefix + entry.name
        try:
            # +1 leaves room for a directory's trailing slash; longer names could not be unpacked
            if len(arcname.encode("utf-8")) + 1 > MAX_NAME_BYTES:
                added = False
            elif entry.is_dir(follow_symlinks=False):
                added = depth < MAX_DEPTH and _add_dir(
                    zf, dir_fd, entry.name, arcname, depth, follow=False
                )
            else:
                added = entry.is_file(follow_symlinks=False) and _add_file(
                    zf, dir_fd, entry.name, arcname, follow=False
                )
        except (OSError, UnicodeEncodeError) as exc:
            logger.debug("archive: skipped %r: %s", arcname, exc)
            continue
        if not added:
            logger.debug("archive: skipped %r: a link, a special file, or too deep", arcname)


def _add_dir(
    zf: zipfile.ZipFile, dir_fd: int | None, name: str, arcname: str, depth: int, *, follow: bool
) -> bool:
    fd = os.open(name, _DIR_FLAGS if follow else _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        info = zipfile.ZipInfo(arcname + "/", _dos_time(os.fstat(fd).st_mtime))
        info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: MS-DOS directory bit
        zf.writestr(info, b"")
        _add_tree(zf, fd, arcname + "/", depth + 1)
    finally:
        os.close(fd)
    return True


def _add_file(
    zf: zipfile.ZipFile, dir_fd: int | None, name: str, arcname: str, *, follow: bool = False
) -> bool:
    """Add one regular file, reading at most the size it had when opened; False if not regular."""
    fd = os.open(name, _READ_FLAGS if follow else _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        info = zipfile.ZipInfo(arcname, _dos_time(st.st_mtime))
        info.external_attr = (stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)) << 16
        if st.st_size < _SMALL_FILE_BYTES:
            zf.writestr(info, os.read(fd, st.st_size) if st.st_size else b"")
            return True
        info.compress_type = zipfile.ZIP_DEFLATED
        info._compresslevel = 1  # type: ignore[attr-defined]  # public (compress_level) in 3.13
        info.file_size = st.st_size
        with zf.open(info, "w") as out:
            remaining = st.st_size
            while remaining > 0 and (chunk := os.read(fd, min(_CHUNK_BYTES, remaining))):
                out.write(chunk)
                remaining -= len(chunk)
        return True
    finally:
        os.close(fd)


def _dos_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    try:
        t = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return _DOS_EPOCH
    stamp = (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    return min(max(stamp, _DOS_EPOCH), _DOS_END)
