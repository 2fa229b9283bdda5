"""Workdir files (config, metrics, results) on local disks and object stores alike (`gs://...`).

Paths go through `etils.epath`, as Orbax's do: a `gs://` workdir needs `gcsfs` (`pip install
'unialign_jax[gcs]'`) or TensorFlow. Every process of a multi-host run sees the same workdir, so
only process 0 writes; all processes may read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from etils import epath


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
