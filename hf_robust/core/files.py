"""Atomic file publication with ordinary permissions.

Files and folders are written under a temporary name and moved into place, so a reader never sees half of one;
`tempfile.mkstemp` / `mkdtemp` make them owner-only, which would hide a shared cache or run folder from other
users: `publish` gives them the permissions of a normally created file or folder (the umask applied).
"""

from __future__ import annotations

import os
from pathlib import Path


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move the finished temporary file or folder `tmp` to `path` (atomically), with default permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask)
    os.replace(tmp, path)
