"""Workdir files (config, metrics, results) on local disks and object stores alike (`gs://...`).

Paths go through `etils.epath`, as Orbax's do: a `gs://` workdir needs `gcsfs` (`pip install
'unialign_jax[gcs]'`) or TensorFlow. Every process of a multi-host run sees the same workdir, so
only process 0 writes; all processes may read. `WorkdirLock` keeps two runs out of one workdir.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

import jax
from etils import epath

from unialign_jax.errors import UserError
from unialign_jax.logs import logger


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0)."""
    return jax.process_index() == 0


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def write_atomic(path: epath.PathLike, content: str | bytes) -> epath.Path:
    """Writes `content` to a temporary file beside `path` and renames it into place (process 0 only),
    so a reader never sees half a file. Creates the parent directory. Returns the path."""
    path = epath.Path(path)
    if not is_primary():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content, encoding="utf-8")
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_json_atomic(path: epath.PathLike, payload: Any) -> epath.Path:
    return write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: epath.PathLike) -> Any:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))


def append_text(path: epath.PathLike, text: str) -> None:
    """Appends `text` to `path` (process 0 only). Object stores cannot append (gcsfs silently
    overwrites), so there the file is read and rewritten whole, atomically."""
    path = epath.Path(path)
    if not is_primary():
        return
    if _is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    write_atomic(path, previous + text)


class WorkdirError(UserError, OSError):
    """A workdir that cannot be used: a file, not writable, an unusable name."""


def check_writable_dir(workdir: epath.PathLike) -> epath.Path:
    """Creates `workdir` if needed and checks that this process can write in it (process 0 writes a
    probe file and removes it); `WorkdirError` naming the path and the reason otherwise."""
    path = epath.Path(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise WorkdirError(f"--workdir {workdir} is a file, not a directory.")
        path.mkdir(parents=True, exist_ok=True)
        if is_primary():
            probe = path / f".write-probe.{os.getpid()}"
            probe.write_text("", encoding="utf-8")
            probe.unlink()
    except WorkdirError:
        raise
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise WorkdirError(f"--workdir {workdir} cannot be written: {reason}.") from error
    return path


def remove_if_empty(directory: epath.PathLike) -> None:
    """Removes `directory` if it holds nothing (process 0)."""
    path = epath.Path(directory)
    if is_primary() and path.is_dir() and not any(True for _ in path.iterdir()):
        path.rmdir()


class WorkdirLocked(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


class WorkdirLock:
    """Holds `workdir/.lock` (JSON {pid, host, started}) while a run uses the workdir.

    A context manager; only process 0 locks (the other processes do nothing). Local paths: the lock
    is created with O_EXCL, so of two runs only one gets it; a lock whose process (on this host) is
    gone is taken over with a warning. Object stores (`gs://`): best effort only. The check and the
    write are separate requests, so two runs starting at the same moment may both pass, and a lock
    from another host is never taken as stale (its pid cannot be checked from here).
    """

    def __init__(self, workdir: epath.PathLike):
        self.path = epath.Path(workdir) / ".lock"
        self._owner: dict | None = None

    def __enter__(self) -> WorkdirLock:
        if is_primary():
            self._acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        """Deletes the lock, unless another run has replaced it meanwhile."""
        if self._owner is not None and self._holder() == self._owner:
            self.path.unlink()
        self._owner = None

    def _acquire(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create(json.dumps(owner)):
            holder = self._holder()
            pid = holder.get("pid")
            if holder.get("host") != owner["host"] or not isinstance(pid, int) or _pid_alive(pid):
                raise WorkdirLocked(self._in_use(holder))
            logger.warning("Taking over the stale lock %s: pid %d on %s is gone.", self.path, pid, holder["host"])
            self.path.unlink(missing_ok=True)
            if not self._create(json.dumps(owner)):
                raise WorkdirLocked(self._in_use(self._holder()))
        self._owner = owner

    def _create(self, text: str) -> bool:
        """Writes `text` to the lock unless it exists; whether it did."""
        if not _is_local(self.path):
            if self.path.exists():
                return False
            self.path.write_text(text, encoding="utf-8")
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True

    def _holder(self) -> dict:
        """The lock's JSON; {} when it is unreadable or gone."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _in_use(self, holder: dict) -> str:
        if not holder:
            return f"{self.path.parent} is locked ({self.path} is unreadable); delete it if no run uses this workdir."
        return (f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('started')}; stop that run, or delete {self.path} if it is gone.")
