"""Meshes, sharding rules, multi-host start-up and global batches.

The mesh has named axes from `config.mesh` (e.g. `[("data", -1)]`, or `[("data", 2), ("fsdp", 4)]`),
all of type `AxisType.Auto` so XLA's partitioner propagates shardings through the CMG/COMET model
(with Explicit axes every sharded contraction would need an `out_sharding`). Parameters are placed by
an ordered regex rule table `config.sharding_rules = [(regex, spec), ...]` over '/'-joined parameter
paths; the first match wins, unmatched leaves are replicated. A spec is a tuple with one entry per
array dimension (a mesh axis name, a tuple of names, or None), or the string "fsdp" which shards the
largest dimension divisible by the `fsdp` axis size.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from unialign_jax.logs import logger
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment asks for multi-host.

    `UNIALIGN_DISTRIBUTED=1` (set by the launchers) initialises with auto-detection (TPU pods, SLURM);
    `UNIALIGN_COORDINATOR`, `UNIALIGN_NUM_PROCESSES` and `UNIALIGN_PROCESS_ID` give explicit values
    (e.g. several processes on one machine).
    """
    coordinator = os.environ.get("UNIALIGN_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["UNIALIGN_NUM_PROCESSES"]),
            process_id=int(os.environ["UNIALIGN_PROCESS_ID"]),
        )
    elif os.environ.get("UNIALIGN_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    else:
        return
    logger.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from `[(name, size), ...]`; one size may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in mesh_axes)
    sizes = [int(size) for _, size in mesh_axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may have size -1, got {list(mesh_axes)}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices do not divide into {list(mesh_axes)}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"config.mesh: {list(mesh_axes)} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are available."
        )
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    return tuple(name for name in mesh.axis_names if name in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the data axes; the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec_for(shape: tuple[int, ...], spec: Any, mesh: Mesh) -> P:
    if spec == "fsdp":
        size = mesh.shape.get("fsdp", 1)
        candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % size == 0 and shape[d] >= size]
        if size == 1 or not candidates:
            return P()
        axes = [None] * len(shape)
        axes[int(candidates[0])] = "fsdp"
        return P(*axes)
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {spec} has more entries than the array has dimensions {shape}.")
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) from ordered regex rules."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def leaf_sharding(path, leaf):
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec_for(tuple(leaf.shape), spec, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays sharded on the data axes."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in host_batch.items()
    }


def flatten_names(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} view of a nested dict."""
    return traverse_util.flatten_dict(tree, sep="/")
