"""A trained stage read back, from a workdir or from an export directory, and written as an export.

An export directory (`write_export`, `python -m unialign_jax.export`) holds

    weights.safetensors   the method's `export_fields` of the stage's final state, flattened with
                          '/'-joined keys ('params/adapter/...'): trained weights only, no optimizer
                          state, no training-only estimators
    manifest.json         format, method, stage, the resolved config, every array's shape and dtype,
                          the frozen backbone it expects (`backbone.source`, and a SHA-256 fingerprint
                          of its arrays, checked when the backbone is read back) and library versions

`read_export` rebuilds a state of the stage from it (the backbone from its weights file) that the
method's `embedder` takes like a restored checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import traverse_util

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import evaluate
from unialign_jax import files
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import parallel
from unialign_jax.inputs import InputError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1
_FIELDS = ("params", "frozen", "quantizer", "carry")  # TrainState fields a method may export


def select_stage(config: ml_collections.ConfigDict, name: str | None, workdir: str) -> loop.StageSpec:
    """The finished stage called `name` (or whose folder it is); None: the last finished stage."""
    specs = loop.stage_specs(config)
    if name is not None:
        matching = [s for s in specs if name in (s.name, s.folder)]
        if not matching:
            raise InputError(f"stage {name!r}: {workdir} has stages {[s.name for s in specs]}")
        if not loop.stage_finished(workdir, matching[0]):
            raise InputError(f"stage {name!r} of {workdir} has not finished training")
        return matching[0]
    finished = [s for s in specs if loop.stage_finished(workdir, s)]
    if not finished:
        raise InputError(f"{workdir} has no finished stage yet")
    return finished[-1]


def restore_workdir(workdir: str, stage: str | None = None) -> tuple[ml_collections.ConfigDict, loop.StageSpec,
                                                                      loop.TrainState]:
    """(config, stage, final state) of a finished stage of a workdir (`select_stage`)."""
    try:
        config = evaluate.read_config(workdir)
    except FileNotFoundError as error:
        raise InputError(str(error)) from error
    spec = select_stage(config, stage, workdir)
    return config, spec, loop.restore_finished(config, spec, workdir, parallel.make_mesh(config.mesh))


def flat_arrays(tree: dict) -> dict[str, np.ndarray]:
    """{'a/b/c': host array} of a nested dict of arrays."""
    return {key: np.asarray(value) for key, value in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def fingerprint(tree: dict) -> str:
    """SHA-256 over the sorted paths, dtypes, shapes and bytes of a tree's arrays."""
    digest = hashlib.sha256()
    for key, value in sorted(flat_arrays(tree).items()):
        digest.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def write_export(workdir: str, out: str, stage: str | None = None) -> pathlib.Path:
    """Writes the export of a finished stage of `workdir` into the new or empty directory `out`."""
    out_dir = pathlib.Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"--out={out}: exists and is not an empty directory")
    config, spec, state = restore_workdir(workdir, stage)
    method = methods.for_config(config)
    fields = method.export_fields(config)
    arrays = {f"{field}/{key}": value for field in fields for key, value in flat_arrays(getattr(state, field)).items()}
    backbone = {"source": method.backbone_source(config), "fingerprint": ""}
    if "frozen" not in fields:
        backbone["fingerprint"] = fingerprint(state.frozen)
    manifest = {
        "format": FORMAT,
        "method": config.method,
        "stage": spec.name,
        "fields": list(fields),
        "arrays": {key: {"shape": list(value.shape), "dtype": str(value.dtype)}
                   for key, value in sorted(arrays.items())},
        "backbone": backbone,
        "config": json.loads(config.to_json_best_effort(sort_keys=True)),
        "versions": ckpt_lib.library_versions(),
        "workdir": str(workdir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out_dir / WEIGHTS))
    files.write_json_atomic(out_dir / MANIFEST, manifest)  # last: a directory with a manifest is complete
    return out_dir


def read_export(path: str, stage: str | None = None, backbone: str | None = None) -> tuple[
        ml_collections.ConfigDict, loop.StageSpec, loop.TrainState]:
    """(config, stage, state) of an export directory; the left-out frozen backbone from `backbone`
    (None: where the run found it), checked against the manifest's fingerprint."""
    directory = epath.Path(path)
    manifest = files.read_json(directory / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{directory / MANIFEST}: export format {manifest.get('format')!r}; "
                         f"this version reads format {FORMAT}")
    config = evaluate.config_from_json(manifest["config"])
    spec = next(s for s in loop.stage_specs(config) if s.name == manifest["stage"])
    if stage not in (None, spec.name, spec.folder):
        raise InputError(f"stage {stage!r}: the export {path} holds stage {spec.name!r} only")
    try:
        arrays = safetensors.numpy.load_file(str(directory / WEIGHTS))
    except (OSError, safetensors.SafetensorError) as error:
        raise InputError(f"{directory / WEIGHTS}: unreadable ({error})") from error
    listed = manifest["arrays"]
    if set(arrays) != set(listed) or any(str(arrays[k].dtype) != listed[k]["dtype"]
                                         or arrays[k].size != np.prod(listed[k]["shape"], dtype=int) for k in listed):
        raise InputError(f"{directory / WEIGHTS}: its arrays differ from those listed in {MANIFEST}")
    arrays = {key: value.reshape(listed[key]["shape"]) for key, value in arrays.items()}  # scalars come back [1]
    tree = traverse_util.unflatten_dict(arrays, sep="/")
    parts = {field: tree.get(field, {}) for field in _FIELDS}
    if "frozen" in manifest["fields"] and backbone:
        raise InputError(f"backbone={backbone}: the export {path} holds every weight and takes no backbone")
    if "frozen" not in manifest["fields"]:
        parts["frozen"] = methods.for_config(config).frozen_backbone(config, backbone)
        found, expected = fingerprint(parts["frozen"]), manifest["backbone"]["fingerprint"]
        if found != expected:
            raise InputError(f"backbone weights {backbone or manifest['backbone']['source']}: not the weights the "
                             f"model was trained with (fingerprint {found[:12]}, expected {expected[:12]})")
    state = loop.TrainState(step=np.zeros((), np.int32), aux={}, opt_state={}, rng=jax.random.key(0), **parts)
    return config, spec, state
