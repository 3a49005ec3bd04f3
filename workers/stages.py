"""A staged job: its source fetched, setup steps, modules and output chosen around its command.

A job with any of the staged headers (``SourceUrl``, ``SetupSteps``, ``TransferOutput``,
``PreModules``, ``PostModules``) does not run its command directly: the node writes a
POSIX shell script into ``.dispatch-stages/`` in its working directory and runs that
instead, as the job's account, in the job's cgroups, under the job's time limit. The
script runs, in order, the pre-run modules, ``git`` to fetch the source, each setup step,
the command, then the post-run modules, and notes each stage's exit code in a status
file. When it has ended the node reads that file (:meth:`StagedRun.finish`): which stage
failed becomes the reply's Reason, the modules' output becomes job attributes (relayed
through the node's chirp socket, so they reach the reply queue and the ledger), and the
working directory is cut down to ``TransferOutput`` before it is zipped.

Plain jobs never come here: they have no :class:`~dispatch.job.Stages`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from dispatch import chirp
from dispatch.errors import InvalidMessageError
from dispatch.job import JobRequest, Stages

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODULES_DIR", "STAGE_DIR", "StagedRun", "modules_dir", "select_output"]

DEFAULT_MODULES_DIR = "/etc/dispatch/modules"
STAGE_DIR = ".dispatch-stages"
#: Most of a module's output kept as its attribute (the tail; a chirp datagram is 8 KiB).
MAX_NOTE_CHARS = 3000
_MAX_STATUS_BYTES = 65536

_PRELUDE = r"""# Written by the Dispatch node for job {job_id}: its stages, in order.
st={stage_dir}
note() {{ printf '%s %s %s\n' "$1" "$2" "$3" >>"$st/status"; }}
fetch() {{
  export GIT_TERMINAL_PROMPT=0 GIT_ALLOW_PROTOCOL=file:git:http:https:ssh
  git init -q . && git remote add origin "$1" || return
  if git fetch -q --depth 1 origin "$2"; then
    git checkout -q -f FETCH_HEAD
  else
    printf 'dispatch: no shallow fetch of %s; fetching the whole repository\n' "$2" >&2
    git fetch -q --tags origin '+refs/heads/*:refs/remotes/origin/*' &&
      git checkout -q -f "$2"
  fi || return
  if [ -f .gitmodules ]; then
    git -c protocol.file.allow=always submodule -q update --init --recursive --depth 1 ||
      git -c protocol.file.allow=always submodule -q update --init --recursive
  fi
}}
"""


def modules_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return where the operator installs modules (``DISPATCH_MODULES_DIR``)."""
    env = os.environ if environ is None else environ
    return Path(env.get("DISPATCH_MODULES_DIR") or DEFAULT_MODULES_DIR)


class StagedRun:
    """The script of one staged job, and what the node makes of it once it has ended."""

    def __init__(self, request: JobRequest, workdir: Path, modules: Path) -> None:
        if request.spec.stages is None:
            raise ValueError("not a staged job")
        self.request = request
        self.stages: Stages = request.spec.stages
        self.workdir = workdir
        self.modules = modules
        self.notes: list[tuple[str, str]] = []

    @property
    def script(self) -> Path:
        """Return the path of the script the job runs."""
        return self.workdir / STAGE_DIR / "run.sh"

    def check_modules(self) -> None:
        """Raise InvalidMessageError naming a module this node does not have."""
        for header, names in (("PreModules", self.stages.pre_modules),
                              ("PostModules", self.stages.post_modules)):
            for name in names:
                if not os.access(self.modules / name, os.X_OK):
                    raise InvalidMessageError(
                        f"module {name!r} is not installed on this node ({self.modules})",
                        field=header)

    @property
    def argv(self) -> list[str]:
        """Return the command line that runs the script."""
        return ["/bin/sh", str(self.script)]

    def write(self) -> None:
        """Write the script into the working directory (before it is given to the job)."""
        (self.workdir / STAGE_DIR).mkdir(mode=0o700)
        self.script.write_text(self._text(), encoding="utf-8")

    def _text(self) -> str:
        st, spec = self.stages, self.request.spec
        lines = [_PRELUDE.format(job_id=self.request.job_id, stage_dir=shlex.quote(STAGE_DIR))]
        lines += [self._module("pre", name) for name in st.pre_modules]
        if st.source:
            lines.append(_say(f"fetching {st.source}" + (f" at {st.ref}" if st.ref else "")))
            lines.append(_checked(f"fetch {shlex.quote(st.source)} "
                                  f"{shlex.quote(st.ref or 'HEAD')} </dev/null", "fetch", "-"))
        for index, step in enumerate(st.setup, 1):
            lines.append(_say(f"setup {index}/{len(st.setup)}: {step}"))
            lines.append(_checked(f"/bin/sh -c {shlex.quote(step)} </dev/null", "setup", index))
        lines.append(shlex.join([spec.command, *spec.arguments]) + '; c=$?; note command - "$c"')
        lines += [self._module("post", name) for name in st.post_modules]
        lines.append('exit "$c"')
        return "\n".join(lines) + "\n"

    def _module(self, when: str, name: str) -> str:
        path = shlex.quote(str(self.modules / name))
        out = f'"$st"/{when}.{shlex.quote(name)}.out'
        run = f"{path} {when} </dev/null >{out} 2>&1"
        if when == "post":
            return f'DISPATCH_EXIT_CODE="$c" {run}; note post-module {name} "$?"'
        return _checked(run, "pre-module", name)

    def finish(self, keep: Sequence[str]) -> str | None:
        """Read what the script noted, choose the output; return why setup failed, if it did.

        Fills ``notes`` with the attributes to publish. ``keep`` are names that always
        come back (the job's Out and Err).
        """
        stage_dir = self.workdir / STAGE_DIR
        reason = None
        try:
            with (stage_dir / "status").open("rb") as f:
                status = f.read(_MAX_STATUS_BYTES).decode("utf-8", "replace").splitlines()
        except OSError:
            status = []
        for line in status:
            kind, _, rest = line.partition(" ")
            name, _, code = rest.partition(" ")
            if kind.endswith("-module"):
                self._note_module(stage_dir, kind, name, code)
            if code != "0" and kind in ("pre-module", "fetch", "setup") and reason is None:
                reason = self._failure(kind, name, code)
        if reason is not None:
            self.notes.append(("SetupFailure", reason))
        shutil.rmtree(stage_dir, ignore_errors=True)
        if self.stages.output:
            select_output(self.workdir, self.stages.output, keep)
        elif self.stages.source is not None:  # the fetch's bookkeeping is not the job's output
            git = self.workdir / ".git"
            if git.is_dir() and not git.is_symlink():
                shutil.rmtree(git, ignore_errors=True)
        return reason

    def _failure(self, kind: str, name: str, code: str) -> str:
        st = self.stages
        if kind == "fetch":
            where = f" at {st.ref}" if st.ref else ""
            return f"setup failed: fetching {st.source}{where} exited with code {code}"
        if kind == "setup":
            index = int(name) if name.isdecimal() else 0
            step = st.setup[index - 1] if 0 < index <= len(st.setup) else "?"
            return f"setup step {index} of {len(st.setup)} failed with exit code {code}: {step}"
        return f"setup failed: pre-module {name} exited with code {code}"

    def _note_module(self, stage_dir: Path, kind: str, name: str, code: str) -> None:
        when = kind.partition("-")[0]
        try:
            with (stage_dir / f"{when}.{name}.out").open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - MAX_NOTE_CHARS))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        attribute = f"{when.capitalize()}Module_{name.replace('-', '_')}"
        self.notes.append((attribute, f"exit {code}\n{text}"))

    def relay(self, chirp_env: Mapping[str, str]) -> bool:
        """Send the notes to the node's chirp socket as the job would; tell whether any went.

        Never blocks: a note the socket cannot take now is logged and dropped.
        """
        path, token = chirp_env.get(chirp.SOCKET_ENV), chirp_env.get(chirp.TOKEN_ENV)
        if not (self.notes and path and token):
            return False
        sent = False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for name, value in self.notes:
                try:
                    sock.sendto(_datagram(token, name, value), socket.MSG_DONTWAIT, path)
                    sent = True
                except (OSError, InvalidMessageError) as exc:
                    log.warning("job %s: attribute %s not recorded: %s", self.request.job_id,
                                name, exc)
        return sent


def _datagram(token: str, name: str, value: str) -> bytes:
    """Return the chirp datagram of a note, its value shortened from the front to fit."""
    while True:
        try:
            return chirp.encode(token, name, value)
        except InvalidMessageError:
            if len(value) < 100:
                raise
            value = "…" + value[len(value) // 4:]


def _say(text: str) -> str:
    return f"printf 'dispatch: %s\\n' {shlex.quote(text)} >&2"


def _checked(command: str, kind: str, name: object) -> str:
    return f'{command}; c=$?; note {kind} {name} "$c"; [ "$c" -eq 0 ] || exit "$c"'


def select_output(root: Path, globs: Sequence[str], keep: Sequence[str]) -> None:
    """Remove from ``root`` every file no glob matches, except ``keep``; symlinks not followed.

    A glob matching a directory keeps all of it; ``**`` matches any depth.
    """
    wanted = [_glob_regex(g) for g in globs]
    kept = set(keep)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = prefix + name
            if rel not in kept and not any(w.match(rel) for w in wanted):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
        if prefix and not any(w.match(rel_dir) for w in wanted):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # only when nothing under it was kept


def _glob_regex(glob: str) -> re.Pattern[str]:
    """Return a regex for a glob over relative paths: ``*`` and ``?`` stay in one directory."""
    out, i = [], 0
    glob = glob.strip().strip("/")
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(glob[i], re.escape(glob[i])))
            i += 1
    return re.compile("".join(out) + r"(?:/.*)?\Z", re.S)
