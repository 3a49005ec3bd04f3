"""SSH keys of multi-node jobs: the per-job key pair, and the authorized_keys lines nodes add.

Each multi-node job gets an ed25519 key pair made by its head for that job alone. The
nodes it gathers (the head included) authorize the public key in the authorized_keys
file their sshd reads for the SSH user (``dispatch worker --ssh-authorized-keys``), on a
line ending ``dispatch-gang:<job id>`` with ``restrict`` (no forwarding, no pty), and
remove it when the job lets them go; a node starting up removes any it left behind.
Edits take an exclusive lock and replace the file atomically, so the head's driver and
the node can both edit one file. Keys are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch.gang import KEY_COMMENT

__all__ = ["add_key", "host_key_line", "new_key_pair", "remove_keys"]


def new_key_pair(job_id: str) -> tuple[bytes, str]:
    """Return a new private key (OpenSSH PEM) and its public key line for ``job_id``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def add_key(path: Path, public: str, job_id: str) -> None:
    """Authorize ``public`` (restricted) in ``path`` until :func:`remove_keys` for ``job_id``."""
    line = f"restrict {_key_only(public)} {KEY_COMMENT}{job_id}\n"
    with _locked(path) as lines:
        lines.append(line)


def remove_keys(path: Path, job_id: str | None = None) -> int:
    """Remove the lines added for ``job_id`` (for every job when None); return how many."""
    if not path.exists():
        return 0
    with _locked(path) as lines:
        before = len(lines)
        lines[:] = [ln for ln in lines if not _added_for(ln, job_id)]
        return before - len(lines)


def host_key_line(path: Path) -> str:
    """Return the ``TYPE BASE64`` of an sshd host public key file (its comment dropped)."""
    return _key_only(path.read_text(encoding="ascii").strip())


def _key_only(line: str) -> str:
    words = line.split()
    if len(words) < 2:
        raise ValueError("not an OpenSSH public key line")
    return f"{words[0]} {words[1]}"


def _added_for(line: str, job_id: str | None) -> bool:
    comment = line.rstrip("\n").rsplit(" ", 1)[-1]
    if not comment.startswith(KEY_COMMENT):
        return False
    return job_id is None or comment == KEY_COMMENT + job_id


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[str]]:
    """Yield the file's lines under an exclusive lock; write them back atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            lines = []
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        before = list(lines)
        yield lines
        if lines != before:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.writelines(lines)
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
    finally:
        os.close(lock)
