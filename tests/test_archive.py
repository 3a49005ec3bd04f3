"""Unit tests for dispatch.archive: packing job directories and inputs, unpacking untrusted zips."""

from __future__ import annotations

import io
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispatch import archive, extraction
from dispatch.archive import (
    ZIP_CONTENT_TYPE,
    is_zip,
    zip_directory,
    zip_flat_directory,
    zip_paths,
)
from dispatch.errors import ArchiveError
from dispatch.extraction import Extracted, ExtractLimits, safe_extract

SECRET = b"root:$6$very-secret-hash:19000:0:99999:7:::"
MiB = 1 << 20


def _entry(name: str, mode: int | None = None) -> zipfile.ZipInfo:
    """A ZipInfo carrying ``name`` verbatim (the constructor would cut it at a NUL)."""
    info = zipfile.ZipInfo("placeholder")
    info.filename = name
    if mode is not None:
        info.external_attr = mode << 16
    return info


def _zip(
    *members: tuple[zipfile.ZipInfo | str, bytes],
    compress_type: int = zipfile.ZIP_STORED,
    tamper: Callable[[zipfile.ZipFile], None] | None = None,
) -> bytes:
    """Build a zip by hand; ``tamper`` may edit central-directory fields before it is written."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in members:
            zf.writestr(info, data, compress_type=compress_type)
        if tamper is not None:
            tamper(zf)
    return buf.getvalue()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (directories map to None), without following links."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = None
        for name in filenames:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside both the job dir and dest, holding a secret."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "shadow").write_bytes(SECRET)
    return path


@pytest.fixture
def count_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the bytes passed to os.write while the test runs."""
    written = [0]
    real_write = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(archive.os, "write", spy)
    yield written


# --- packing -------------------------------------------------------------------------------


def test_the_public_api_is_exported() -> None:
    assert set(archive.__all__) == {"MAX_DEPTH", "MAX_NAME_BYTES", "ZIP_CONTENT_TYPE", "FlatZip",
                                    "is_zip", "zip_directory", "zip_flat_directory",
                                    "zip_paths"}
    assert set(extraction.__all__) == {"ExtractLimits", "Extracted", "safe_extract"}
    assert ZIP_CONTENT_TYPE == "application/zip"


def test_a_flat_directory_zips_in_one_pass_to_the_same_bytes_as_zipfile(tmp_path: Path) -> None:
    (tmp_path / "job.out").write_bytes(b"")
    (tmp_path / "job.err").write_bytes(b"warning\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(3000) + b"a" * 20000)  # deflated
    (tmp_path / "h\u00e9llo.txt").write_bytes(b"x" * 5000)  # a UTF-8 name
    (tmp_path / "run.sh").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "link").symlink_to("/etc/passwd")  # left out, as links always are
    os.mkfifo(tmp_path / "fifo")  # left out, never opened
    flat = zip_flat_directory(tmp_path, MiB)
    assert flat is not None
    assert flat.data == zip_directory(tmp_path)
    assert set(flat.names) == {p.name for p in tmp_path.iterdir()}
    with zipfile.ZipFile(io.BytesIO(flat.data)) as zf:
        assert zf.testzip() is None
        assert zf.read("big.bin") == (tmp_path / "big.bin").read_bytes()
        assert zf.read("h\u00e9llo.txt") == b"x" * 5000
        assert stat.S_IMODE(zf.getinfo("run.sh").external_attr >> 16) == 0o755
        assert "link" not in zf.namelist() and "fifo" not in zf.namelist()


def test_an_empty_directory_zips_to_an_empty_archive(tmp_path: Path) -> None:
    flat = zip_flat_directory(tmp_path, MiB)
    assert flat is not None and flat.names == ()
    assert flat.data == zip_directory(tmp_path) and is_zip(flat.data)


def test_a_directory_with_a_subdirectory_or_too_much_data_is_left_to_zipfile(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").write_bytes(b"y" * 1000)
    assert zip_flat_directory(tmp_path, 999) is None
    assert zip_flat_directory(tmp_path, 1000) is not None
    (tmp_path / "sub").mkdir()
    assert zip_flat_directory(tmp_path, MiB) is None


def test_a_tree_with_nested_and_empty_dirs_and_an_executable_file_round_trips(
    job_dir: Path, dest: Path
) -> None:
    (job_dir / "job.out").write_text("hello\n")
    (job_dir / "job.err").write_bytes(b"")
    (job_dir / "a" / "b" / "c").mkdir(parents=True)
    (job_dir / "a" / "b" / "c" / "deep.bin").write_bytes(os.urandom(10_000))
    (job_dir / "empty" / "nested-empty").mkdir(parents=True)
    script = job_dir / "a" / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)

    data = zip_directory(job_dir)
    result = safe_extract(data, dest)

    assert is_zip(data)
    assert _tree(dest) == _tree(job_dir)
    assert "empty/nested-empty/" in result.names
    assert result.skipped == ()
    assert stat.S_IMODE((dest / "a" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "job.out").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "empty").stat().st_mode) == 0o755


def test_zip_entries_are_sorted_and_small_files_stored_and_large_ones_deflated(
    job_dir: Path,
) -> None:
    (job_dir / "b.txt").write_bytes(b"x" * 100)
    (job_dir / "a.log").write_bytes(b"log line\n" * 10_000)
    (job_dir / "c").mkdir()

    with zipfile.ZipFile(io.BytesIO(zip_directory(job_dir))) as zf:
        assert zf.namelist() == ["a.log", "b.txt", "c/"]
        assert zf.getinfo("a.log").compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo("b.txt").compress_type == zipfile.ZIP_STORED
        assert zf.read("a.log") == b"log line\n" * 10_000


def test_zipping_never_follows_a_symlink_planted_in_the_job_dir(
    job_dir: Path, outside: Path
) -> None:
    (job_dir / "job.out").write_text("ok")
    (job_dir / "shadow").symlink_to(outside / "shadow")
    (job_dir / "etc").symlink_to(outside, target_is_directory=True)

    data = zip_directory(job_dir)

    assert SECRET not in data
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["job.out"]


def test_files_dated_outside_the_zip_calendar_are_still_zipped(job_dir: Path, dest: Path) -> None:
    (job_dir / "epoch.txt").write_text("1970")
    (job_dir / "future.txt").write_text("2200")
    os.utime(job_dir / "epoch.txt", (0, 0))
    os.utime(job_dir / "future.txt", (7_258_118_400, 7_258_118_400))

    assert safe_extract(zip_directory(job_dir), dest).names == ("epoch.txt", "future.txt")


@pytest.mark.timeout(10)
def test_a_fifo_in_the_job_dir_is_skipped_without_blocking(job_dir: Path) -> None:
    os.mkfifo(job_dir / "pipe")
    (job_dir / "job.out").write_text("ok")

    with zipfile.ZipFile(io.BytesIO(zip_directory(job_dir))) as zf:
        assert zf.namelist() == ["job.out"]


def test_a_file_that_vanishes_while_zipping_is_skipped(
    job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job_dir / "gone").write_text("soon deleted")
    (job_dir / "job.out").write_text("ok")
    real_open = os.open

    def open_after_delete(path: str, flags: int, *args: int, **kwargs: int | None) -> int:
        if path == "gone":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(archive.os, "open", open_after_delete)
    data = zip_directory(job_dir)
    monkeypatch.undo()

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["job.out"]


def test_zipping_a_missing_directory_raises_archive_error(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no-such-dir"):
        zip_directory(tmp_path / "no-such-dir")


def test_zip_paths_puts_a_file_under_its_basename_and_a_directory_under_its_own_name(
    tmp_path: Path, dest: Path
) -> None:
    (tmp_path / "in" / "data" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "data" / "sub" / "x.csv").write_text("1,2\n")
    (tmp_path / "in" / "params.json").write_text("{}")

    data = zip_paths([tmp_path / "in" / "params.json", tmp_path / "in" / "data"])
    result = safe_extract(data, dest)

    assert sorted(result.names) == ["data/", "data/sub/", "data/sub/x.csv", "params.json"]
    assert (dest / "data" / "sub" / "x.csv").read_text() == "1,2\n"


def test_zip_paths_follows_a_named_symlink_but_not_symlinks_inside_a_directory(
    tmp_path: Path, outside: Path, dest: Path
) -> None:
    (tmp_path / "config.ini").write_text("[main]\n")
    (tmp_path / "settings").symlink_to(tmp_path / "config.ini")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shadow").symlink_to(outside / "shadow")

    data = zip_paths([tmp_path / "settings", tmp_path / "data"])
    safe_extract(data, dest)

    assert SECRET not in data
    assert _tree(dest) == {"settings": b"[main]\n", "data/": None}


def test_zip_paths_refuses_two_inputs_with_the_same_name_naming_both(tmp_path: Path) -> None:
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "input.txt").write_text(sub)

    with pytest.raises(ArchiveError) as err:
        zip_paths([tmp_path / "one" / "input.txt", tmp_path / "two" / "input.txt"])

    assert str(tmp_path / "one" / "input.txt") in str(err.value)
    assert str(tmp_path / "two" / "input.txt") in str(err.value)


def test_zip_paths_refuses_a_missing_path_naming_it(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")

    with pytest.raises(ArchiveError, match=r"not-here\.txt"):
        zip_paths([tmp_path / "here.txt", tmp_path / "not-here.txt"])


@pytest.mark.timeout(10)
def test_zip_paths_refuses_a_fifo_named_explicitly(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")

    with pytest.raises(ArchiveError, match="pipe"):
        zip_paths([tmp_path / "pipe"])


# --- unpacking: names ----------------------------------------------------------------------


def test_a_member_named_with_dotdot_is_refused_and_nothing_is_written(dest: Path) -> None:
    data = _zip(("fine.txt", b"fine"), ("../evil.txt", b"evil"))

    with pytest.raises(ArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(data, dest)

    assert not dest.exists()
    assert not (dest.parent / "evil.txt").exists()


@pytest.mark.parametrize(
    "name",
    [
        "a/../../evil.txt",
        "a/b/../../../evil.txt",
        "/tmp/evil.txt",
        "//server/share/evil.txt",
        "C:/evil.txt",
        "c:evil.txt",
        "a\\..\\..\\evil.txt",
        "..\\evil.txt",
        "ok.txt\x00/../../evil.txt",
        "evil.sh\x00.txt",
        "a/" * 2100 + "evil.txt",
        "x" * 256,
    ],
)
def test_a_hostile_member_name_is_refused_with_one_line_and_nothing_is_written(
    dest: Path, name: str
) -> None:
    data = _zip(("fine.txt", b"fine"), (_entry(name), b"evil"))

    with pytest.raises(ArchiveError) as err:
        safe_extract(data, dest)

    assert "member" in str(err.value)
    assert "\n" not in str(err.value)
    assert not dest.exists()


def test_too_many_members_are_refused_before_anything_is_written(dest: Path) -> None:
    data = _zip(*((f"f{i}", b"") for i in range(11)))

    with pytest.raises(ArchiveError, match="max_files=10"):
        safe_extract(data, dest, ExtractLimits(max_files=10))

    assert not dest.exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize(
    "names",
    [("a.txt", "a.txt"), ("a.txt", "./a.txt"), ("a", "a/b.txt"), ("a/b.txt", "a")],
)
def test_repeated_names_and_file_directory_clashes_are_refused(
    dest: Path, names: tuple[str, str]
) -> None:
    with pytest.raises(ArchiveError, match="member"):
        safe_extract(_zip(*((_entry(n), b"x") for n in names)), dest)

    assert not dest.exists()


def test_encrypted_members_are_refused(dest: Path) -> None:
    def mark_encrypted(zf: zipfile.ZipFile) -> None:
        zf.getinfo("secret.txt").flag_bits |= 0x1

    with pytest.raises(ArchiveError, match=r"'secret\.txt' is encrypted"):
        safe_extract(_zip(("secret.txt", b"x"), tamper=mark_encrypted), dest)


def test_members_compressed_with_other_methods_are_refused(dest: Path) -> None:
    data = _zip(("a.txt", b"x" * 100), compress_type=zipfile.ZIP_BZIP2)

    with pytest.raises(ArchiveError, match=r"'a\.txt' uses unsupported compression"):
        safe_extract(data, dest)


# --- unpacking: sizes ----------------------------------------------------------------------


def test_a_zip_bomb_aborts_as_soon_as_the_total_limit_is_passed(
    dest: Path, count_writes: list[int]
) -> None:
    data = _zip(("bomb.bin", bytes(50 * MiB)), compress_type=zipfile.ZIP_DEFLATED)
    assert len(data) < MiB

    with pytest.raises(ArchiveError, match=r"'bomb\.bin': archive unpacks past 1048576 bytes"):
        safe_extract(data, dest, ExtractLimits(max_total_bytes=MiB, max_ratio=1e9))

    assert count_writes[0] <= MiB
    assert list(dest.iterdir()) == []


def test_a_member_never_expands_past_max_ratio_times_its_compressed_size(
    dest: Path, count_writes: list[int]
) -> None:
    data = _zip(("bomb.bin", bytes(50 * MiB)), compress_type=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        compressed = zf.getinfo("bomb.bin").compress_size

    with pytest.raises(ArchiveError, match=r"'bomb\.bin': expands over 200\.0x"):
        safe_extract(data, dest)

    assert count_writes[0] <= 200 * compressed
    assert list(dest.iterdir()) == []


def test_sizes_are_counted_across_members_not_read_from_headers(dest: Path) -> None:
    def understate(zf: zipfile.ZipFile) -> None:
        for info in zf.infolist():
            info.file_size = 1

    members = ((f"part{i}.bin", os.urandom(400_000)) for i in range(3))
    data = _zip(*members, tamper=understate)

    with pytest.raises(ArchiveError):
        safe_extract(data, dest, ExtractLimits(max_total_bytes=MiB))

    assert sum(p.stat().st_size for p in dest.iterdir()) <= MiB


def test_a_header_that_understates_a_member_size_never_yields_more_bytes(dest: Path) -> None:
    big = b"A" * (5 * MiB)

    def understate(zf: zipfile.ZipFile) -> None:
        info = zf.getinfo("big.txt")
        info.file_size = 100
        info.CRC = zlib.crc32(big[:100])

    data = _zip(("big.txt", big), compress_type=zipfile.ZIP_DEFLATED, tamper=understate)
    safe_extract(data, dest, ExtractLimits(max_total_bytes=1000))

    assert (dest / "big.txt").read_bytes() == big[:100]


def test_a_lying_header_with_the_true_checksum_is_refused_as_corrupt(dest: Path) -> None:
    def understate(zf: zipfile.ZipFile) -> None:
        zf.getinfo("big.txt").file_size = 100

    data = _zip(("big.txt", b"A" * MiB), compress_type=zipfile.ZIP_DEFLATED, tamper=understate)

    with pytest.raises(ArchiveError, match=r"'big\.txt' is corrupt"):
        safe_extract(data, dest)

    assert list(dest.iterdir()) == []


# --- unpacking: links, devices and what is already in dest ---------------------------------


def test_symlink_and_device_entries_are_skipped_and_reported(dest: Path, outside: Path) -> None:
    data = _zip(
        (_entry("shadow", stat.S_IFLNK | 0o777), str(outside / "shadow").encode()),
        (_entry("up", stat.S_IFLNK | 0o777), b".."),
        (_entry("fifo", stat.S_IFIFO | 0o644), b""),
        (_entry("tty", stat.S_IFCHR | 0o666), b""),
        (_entry("job.out", stat.S_IFREG | 0o644), b"ok"),
    )

    result = safe_extract(data, dest)

    assert result == Extracted(names=("job.out",), skipped=("shadow", "up", "fifo", "tty"))
    assert sorted(os.listdir(dest)) == ["job.out"]


def test_a_symlink_already_in_dest_is_not_written_through(dest: Path, outside: Path) -> None:
    dest.mkdir()
    (dest / "job.out").symlink_to(outside / "shadow")

    with pytest.raises(ArchiveError, match=r"'job\.out'"):
        safe_extract(_zip(("job.out", b"overwritten")), dest)

    assert (outside / "shadow").read_bytes() == SECRET


def test_a_symlinked_directory_already_in_dest_is_not_written_through(
    dest: Path, outside: Path
) -> None:
    dest.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ArchiveError, match=r"'sub/shadow'.*not a directory"):
        safe_extract(_zip(("sub/shadow", b"overwritten"), ("sub/new", b"new")), dest)

    assert sorted(os.listdir(outside)) == ["shadow"]
    assert (outside / "shadow").read_bytes() == SECRET


@pytest.mark.timeout(10)
def test_a_fifo_already_in_dest_does_not_block_extraction(dest: Path) -> None:
    dest.mkdir()
    os.mkfifo(dest / "job.out")

    with pytest.raises(ArchiveError, match=r"'job\.out'"):
        safe_extract(_zip(("job.out", b"x")), dest)


def test_extracted_files_get_0644_or_0755_and_never_setuid(dest: Path) -> None:
    data = _zip(
        (_entry("suid", stat.S_IFREG | 0o4777), b"#!/bin/sh\n"),
        (_entry("plain", stat.S_IFREG | 0o666), b""),
        (_entry("nomode"), b""),
    )

    safe_extract(data, dest)

    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "plain").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "nomode").stat().st_mode) == 0o644


# --- unpacking: not a zip ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b"PK\x03\x04" + bytes(100), _zip(("a.txt", b"x" * 100))[:60]],
    ids=["empty", "text", "bad-local-header", "truncated"],
)
def test_something_that_is_not_a_zip_raises_archive_error(dest: Path, data: bytes) -> None:
    with pytest.raises(ArchiveError, match="zip"):
        safe_extract(data, dest)

    assert not dest.exists()


def test_a_corrupt_member_raises_archive_error_and_leaves_no_file(dest: Path) -> None:
    text = os.urandom(3000).hex().encode()
    data = bytearray(_zip(("a.txt", text), compress_type=zipfile.ZIP_DEFLATED))
    data[100:120] = bytes(20)  # inside the deflate stream

    with pytest.raises(ArchiveError, match=r"'a\.txt' is corrupt"):
        safe_extract(bytes(data), dest)

    assert list(dest.iterdir()) == []


def test_safe_extract_reads_an_empty_archive_and_a_file_object(dest: Path) -> None:
    assert safe_extract(_zip(), dest) == Extracted(names=(), skipped=())
    assert safe_extract(io.BytesIO(_zip(("a.txt", b"x"))), dest).names == ("a.txt",)


def test_is_zip_looks_only_at_the_magic() -> None:
    assert is_zip(_zip(("a", b"")))
    assert is_zip(_zip())
    assert not is_zip(b"PK")
    assert not is_zip(b"\x1f\x8b\x08\x00")
