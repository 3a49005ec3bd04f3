"""Operators' YAML files (pools, SSH hosts): read with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from dispatch.errors import DispatchError


def read_yaml(path: Path, error: type[DispatchError]) -> object:
    """Return the YAML document at ``path``; raise ``error`` in one line when it cannot be."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise error(f"{path}: not valid YAML{line}") from None
