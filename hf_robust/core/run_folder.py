"""An output folder belongs to one run at a time, and a finished run in it is replaced whole or not at all.

- `OutputDirLock`: an exclusive lock on `output_dir` (`fcntl.flock` on `output_dir/_hf_robust.lock`, which names
  its owner: pid, host, start time, command). The kernel drops the lock when its process dies, however it dies
  (SIGKILL included), so a lock file left behind by a dead run is stale by construction: the next run takes it
  over, with a warning naming the dead owner. A live owner makes the next run fail at once with an error naming
  it.
- `is_finished_run(output_dir)`: a folder holding `results.json` (written last by every run) holds a finished run.
- `swap_in(staging, output_dir)`: moves a complete set of final artefacts (model, config, results, card, plots),
  written into a staging folder inside `output_dir`, into place. The old `results.json` goes first and the new one
  comes last, so at any moment the folder holds either the old finished run or no `results.json` at all: nothing
  half-written looks finished. Every moved file gets the permissions of a normally created file (umask applied).
- `hold_output_dir` / `release_output_dir`: the lock shared by the trainers of one process that use one folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "_hf_robust.lock"
RESULTS_NAME = "results.json"
STAGING_PREFIX = "_final."
TRASH_PREFIX = "_replaced."
# top-level entries a run does not replace or remove when it swaps in its final artefacts
_KEPT_ENTRIES = ("stages", LOCK_NAME)
# weight files of a previous run that would mix with the new ones if left beside them (a sharded model after a
# single-file one, an adapter beside a full model, ...)
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "adapter_config.json")


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked (in use by another run, holds a finished run, not writable);
    raised before any training."""


class OutputDirBusyError(OutputDirError):
    """Another live run holds the output folder's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe_owner(owner: dict) -> str:
    command = owner.get("command")
    return (
        f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started_at', '?')}"
        + (f", command `{command}`" if command else "")
    )


class OutputDirLock:
    """Exclusive, non-blocking lock on a run folder; `acquire()` raises `OutputDirBusyError` naming the owner."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        import fcntl

        if self._fd is not None:
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise unwritable_output_dir(self.output_dir, error) from error
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise unwritable_output_dir(self.output_dir, error) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise OutputDirBusyError(
                    f"output_dir {self.output_dir} is in use by another run ({describe_owner(owner)}; lock file "
                    f"{self.path}). Two runs in one folder would overwrite each other's results: wait for that run "
                    "to end, or pass another --output_dir."
                ) from None
            # the file may have been removed (released) between our open and our lock: then we locked an orphan
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous.get("pid") is not None:
            # a lock file nobody holds: its owner died without releasing it (killed, out of memory, power loss)
            alive = previous.get("host") == socket.gethostname() and _process_alive(int(previous["pid"]))
            logger.warning(
                "Taking over the stale lock of %s in %s (that run ended without releasing it%s).",
                describe_owner(previous), self.output_dir, "" if not alive else "; its pid is now another process",
            )
        owner = {
            "pid": os.getpid(), "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then locks a fresh file
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


# output folders this process holds, with the number of holders of each: one process may run several trainers
# into one folder one after another (a notebook, a resume); another process may not
_HELD_OUTPUT_DIRS: dict[Path, list] = {}


def hold_output_dir(folder: Path) -> None:
    """Lock `folder` for this process (`OutputDirLock`), or count one more holder if it already holds it."""
    key = Path(folder).resolve()
    if key not in _HELD_OUTPUT_DIRS:
        _HELD_OUTPUT_DIRS[key] = [OutputDirLock(folder).acquire(), 0]
    _HELD_OUTPUT_DIRS[key][1] += 1


def release_output_dir(folder: Path) -> None:
    """One holder fewer of `folder`; the lock is released with the last."""
    key = Path(folder).resolve()
    held = _HELD_OUTPUT_DIRS.get(key)
    if held is not None:
        held[1] -= 1
        if held[1] <= 0:
            del _HELD_OUTPUT_DIRS[key]
            held[0].release()


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def unwritable_output_dir(output_dir: Path, error: OSError) -> OutputDirError:
    return OutputDirError(
        f"output_dir {output_dir} cannot be written ({type(error).__name__}: {error.strerror or error}): choose a "
        "folder you can write to (--output_dir), or fix its permissions."
    )


def is_finished_run(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / RESULTS_NAME).is_file()


def refuse_finished_run(output_dir: str | os.PathLike) -> None:
    """The error for a new run (not a resume, no overwrite) into a folder that holds a finished run."""
    raise OutputDirError(
        f"output_dir {output_dir} holds a finished run ({RESULTS_NAME}, model and card): a new run would replace "
        "it. Pass another --output_dir, --overwrite_output_dir to replace it (the old run is kept until the new "
        "one has saved everything), or --resume_from_checkpoint to continue it."
    )


def _default_mode(path: Path) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if path.is_dir() else 0o666) & ~umask


def normalise_permissions(root: str | os.PathLike) -> None:
    """Every file and folder under `root` (included) with the permissions of a normally created one."""
    root = Path(root)
    os.chmod(root, _default_mode(root))
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                os.chmod(path, _default_mode(path))


def new_staging_dir(output_dir: str | os.PathLike) -> Path:
    import tempfile

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output_dir, prefix=STAGING_PREFIX))


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Staging and trash folders of a run that died while saving (called with the lock held)."""
    for path in Path(output_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(output_dir).glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def swap_in(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Move every entry of the complete `staging` folder into `output_dir`, replacing the entries of the same
    name and the weight files of a previous run; `results.json` last. `staging` is removed."""
    import fnmatch
    import tempfile

    staging, output_dir = Path(staging), Path(output_dir)
    normalise_permissions(staging)
    new = sorted(p.name for p in staging.iterdir())
    trash = Path(tempfile.mkdtemp(dir=output_dir, prefix=TRASH_PREFIX))
    # 1. the folder stops looking finished
    if (output_dir / RESULTS_NAME).exists():
        os.replace(output_dir / RESULTS_NAME, trash / RESULTS_NAME)
    # 2. the old entries the new run replaces, and old weights that would mix with the new ones
    for entry in output_dir.iterdir():
        name = entry.name
        if entry in (staging, trash) or name in _KEPT_ENTRIES or name.startswith(("_", ".")):
            continue
        if name in new or any(fnmatch.fnmatch(name, p) for p in _WEIGHT_PATTERNS):
            os.replace(entry, trash / name)
    # 3. the new entries, the finished marker last
    for name in new:
        if name != RESULTS_NAME:
            os.replace(staging / name, output_dir / name)
    if (staging / RESULTS_NAME).exists():
        os.replace(staging / RESULTS_NAME, output_dir / RESULTS_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library reports it only in its message (safetensors' SafetensorError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
