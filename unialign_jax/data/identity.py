"""What data a run reads, pinned in its workdir (`data.json`) so that no later command silently reads
other data.

A data config resolves to one tfds builder config whose name hashes every parameter that shapes the
examples, environment included (e.g. the FSDD folder from $UNIALIGN_FSDD_DIR and the fingerprint of
its files, or the espeak-ng version): `identity(config)` lists them for every data config of a run
config (`stages[i].data`, `eval.data`, per-modality entries) without building anything.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ml_collections
from etils import epath

from unialign_jax import files
from unialign_jax.data import pipeline
from unialign_jax.errors import UserError

FILENAME = "data.json"


class DataMismatchError(UserError, ValueError):
    """The data a command would read is not the data the workdir was trained on."""


def _data_configs(node: Any, path: str):
    """(path, data config) for every data config inside `node` (a dict with a known source `name`)."""
    if isinstance(node, (dict, ml_collections.ConfigDict)):
        if node.get("name") in pipeline.SOURCES and "data_dir" in node:
            yield path, node
            return
        for key, value in node.items():
            yield from _data_configs(value, f"{path}.{key}" if path else key)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _data_configs(value, f"{path}[{i}]")


def identity(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """{config path: {'dataset', 'config', 'parameters'}} of every data config of `config`."""
    result = {}
    for path, data_config in _data_configs(config, ""):
        builder = pipeline.make_builder(data_config)
        description = builder.builder_config.description if builder.builder_config else ""
        result[path] = {"dataset": builder.name,
                        "config": builder.builder_config.name if builder.builder_config else "",
                        "parameters": json.loads(description) if description else {}}
    return result


def digest(current: dict[str, dict]) -> str:
    """16 hex digits naming a data identity (for folders of results on other data)."""
    return hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:16]


def audio_sources(pinned: dict[str, dict]) -> list[str]:
    """The audio source(s) the pinned data renders speech from, e.g. ['FSDD recordings in /data/fsdd']."""
    found = []
    for entry in pinned.values():
        parameters = entry["parameters"]
        if parameters.get("audio_source") == "fsdd":
            found.append(f"FSDD recordings in {parameters['fsdd_dir']} (fingerprint {parameters['fsdd_fingerprint']})")
        elif parameters.get("audio_source") == "espeak":
            found.append(f"espeak-ng {parameters.get('espeak_version', '')}".strip())
    return list(dict.fromkeys(found))


def differences(pinned: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """One line per data config whose identity differs, naming the parameters that changed."""
    lines = []
    for path in sorted(set(pinned) | set(current)):
        old, new = pinned.get(path), current.get(path)
        if old == new:
            continue
        if old is None or new is None:
            lines.append(f"{path}: {'added' if old is None else 'removed'}")
            continue
        keys = sorted(k for k in set(old["parameters"]) | set(new["parameters"])
                      if old["parameters"].get(k) != new["parameters"].get(k))
        changes = ", ".join(f"{k} {old['parameters'].get(k)!r} -> {new['parameters'].get(k)!r}" for k in keys)
        lines.append(f"{path}: {old['config']} -> {new['config']}" + (f" ({changes})" if changes else ""))
    return lines


def pin(workdir: str, current: dict[str, dict], *, write: bool, replace: bool = False) -> None:
    """Checks `current` against the workdir's pinned data (`DataMismatchError` listing what differs);
    with `write`, pins it when the workdir has none yet. `replace`: the pinned data is from a start
    that trained nothing, so a difference replaces it (when writing) instead of failing."""
    path = epath.Path(workdir) / FILENAME
    changed = differences(files.read_json(path), current) if path.exists() else []
    if not path.exists() or (changed and replace):
        if write:
            files.write_json_atomic(path, current)
        return
    if changed:
        error = DataMismatchError(f"{workdir} was trained on other data than this command would read: "
                                  + "; ".join(changed))
        error.hint = ("set the environment as it was (e.g. UNIALIGN_FSDD_DIR), or evaluate on the new data "
                      "with `python -m unialign_jax.evaluate --other_data`, which writes beside the results")
        raise error
