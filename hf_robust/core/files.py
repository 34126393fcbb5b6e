"""Atomic file publication with ordinary permissions, and the JSON the run folder is written in.

Files and folders are written under a temporary name and moved into place, so a reader never sees half of one;
`tempfile.mkstemp` / `mkdtemp` make them owner-only, which would hide a shared cache or run folder from other
users: `publish` gives them the permissions of a normally created file or folder (the umask applied).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move the finished temporary file or folder `tmp` to `path` (atomically), with default permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    publish(tmp, path)


def atomic_write_json(path: Path, obj, strict: bool = False) -> None:
    """`obj` as indented JSON (numpy scalars as numbers, other objects as their `str`). `strict`: standard JSON,
    an undefined value (NaN, e.g. the worst group of data without groups) as null."""
    if strict:
        obj = finite_or_none(obj)
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=not strict)
    atomic_write_bytes(Path(path), text.encode())


def finite_or_none(value):
    """`value` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
