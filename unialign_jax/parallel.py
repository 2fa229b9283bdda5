"""Meshes, sharding rules, multi-host start-up and global batches (DESIGN §7).

Mesh. `config.mesh = ((axis, size), ...)` names the axes, from `MESH_AXES`:
- `data`: data parallelism (the batch is split, everything else replicated);
- `fsdp`: the batch is split AND the parameters/optimizer state that a rule maps to `fsdp` are
  sharded (ZeRO-3 style: XLA gathers a weight where it is used and reduce-scatters its gradient);
- `expert`: the batch is split AND the stacked expert weights a rule maps to `expert` are sharded
  (expert parallelism for MoE layers; the other layers treat the axis as data parallelism).
One size may be -1 (all remaining devices). The axis types are passed explicitly, all
`AxisType.Auto`: the model code is written without sharding annotations and XLA's partitioner
(GSPMD) propagates the shardings of the parameters and the batch through it. With `Explicit` axes
(the default of `jax.make_mesh` in jax 0.10) every contraction over a sharded dimension (each FSDP
matmul) would need an `out_sharding` in the model code.

Sharding rules. `config.sharding_rules = ((regex, spec), ...)`, ordered: a leaf of the sharded tree
(a `TrainState`: paths such as `params/adapter/common/kernel`, `opt_state/1/0/mu/adapter/common/kernel`,
`quantizer/quantizer/embedding`) takes the spec of the first regex that `re.search`es its '/'-joined
path; leaves no rule matches are replicated. A spec is
- a tuple with at most one entry per array dimension (missing trailing entries: not sharded), each
  entry a mesh axis name, a tuple of names, or None. Axes from `MESH_AXES` that the current mesh
  lacks are dropped, so one rule table serves every mesh; or
- `FSDP` ("fsdp"): the largest dimension divisible by the `fsdp` axis size is sharded over it
  (replicated if none is, or if the mesh has no `fsdp` axis).
`FSDP_RULES` is a ready-made table; model-specific tables live beside their models (`nn.moe.EXPERT_RULES`;
`nn.moe.EXPERT_RULES + FSDP_RULES` combines them).
Both fields are tuples so that the command line can set them, e.g.
`--config.mesh="(('data', 2), ('fsdp', 4))"`
`--config.sharding_rules="(('^(params|frozen|opt_state|carry)/', 'fsdp'),)"`.

Multi-host: every process runs the same program; `maybe_initialize_distributed` starts
`jax.distributed` when the environment asks for it, `put_on_mesh` places a state that every process
built identically onto a mesh spanning all processes, each process reads its own slice of every
batch (grain, sharded by process index) and `global_batch` assembles the slices into global arrays.
Nothing here is specific to a model: the CMG/COMET and UniAlign trainers share it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from unialign_jax.logs import logger

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES  # the batch's leading dimension is split over every mesh axis
FSDP = "fsdp"

Rule = tuple[str, Any]

# Parameters, frozen parameters, their optimizer moments and EWC anchors/Fisher, all FSDP.
FSDP_RULES: tuple[Rule, ...] = ((r"^(params|frozen|opt_state|carry)/", FSDP),)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment asks for multi-host; True if it did.

    `UNIALIGN_COORDINATOR=host:port` with `UNIALIGN_NUM_PROCESSES` and `UNIALIGN_PROCESS_ID` gives
    the values explicitly (any cluster; several processes on one machine). `UNIALIGN_DISTRIBUTED=1`
    (set by the launchers in `launch/`) lets JAX detect them (Cloud TPU pods, SLURM, Open MPI).
    Must run before anything touches a JAX device.
    """
    coordinator = os.environ.get("UNIALIGN_COORDINATOR")
    if coordinator:
        missing = [k for k in ("UNIALIGN_NUM_PROCESSES", "UNIALIGN_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"UNIALIGN_COORDINATOR={coordinator} is set but {missing} are not.")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["UNIALIGN_NUM_PROCESSES"]),
            process_id=int(os.environ["UNIALIGN_PROCESS_ID"]),
        )
    elif os.environ.get("UNIALIGN_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    else:
        return False
    logger.info(
        "Process %d of %d: %d local of %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from `((axis, size), ...)` (one size may be -1) over `devices` (default: all devices).

    Axis types are explicit and all `AxisType.Auto` (module docstring).
    """
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(str(name) for name, _ in mesh_axes)
    sizes = [int(size) for _, size in mesh_axes]
    unknown = [name for name in names if name not in MESH_AXES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"config.mesh: axes must be distinct names from {MESH_AXES}, got {list(names)}.")
    if sizes.count(-1) > 1 or any(size < 1 and size != -1 for size in sizes):
        raise ValueError(f"config.mesh: sizes must be positive with at most one -1, got {list(mesh_axes)}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices do not divide into {list(mesh_axes)}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh: {list(mesh_axes)} needs {math.prod(sizes)} devices, {len(devices)} are available."
        )
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over, in mesh order."""
    return tuple(name for name in mesh.axis_names if name in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the batch axes; the other dimensions replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_name(path: Sequence[Any]) -> str:
    """'/'-joined names of a pytree key path (dict keys, dataclass fields, sequence indices)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _on_mesh(entry: Any, mesh: Mesh) -> Any:
    """A spec entry without the axes the mesh lacks (None if none is left)."""
    if entry is None:
        return None
    names = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
    unknown = [name for name in names if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown} (known: {MESH_AXES})")
    kept = tuple(name for name in names if name in mesh.shape)
    if not kept:
        return None
    return kept if len(kept) > 1 else kept[0]


def leaf_spec(name: str, shape: tuple[int, ...], spec: Any, mesh: Mesh) -> P:
    """The PartitionSpec of one array under one rule's `spec` (module docstring); errors name `name`."""
    if spec == FSDP:
        size = mesh.shape.get(FSDP, 1)
        candidates = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % size == 0]
        if size == 1 or not candidates:
            return P()
        axes: list[Any] = [None] * len(shape)
        axes[int(candidates[0])] = FSDP
        return P(*axes)
    if isinstance(spec, str):
        raise ValueError(f"sharding rule for {name!r}: spec {spec!r} must be {FSDP!r} or a tuple of axes.")
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule for {name!r}: spec {tuple(spec)} has more entries than {shape} has dims.")
    try:
        entries = [_on_mesh(entry, mesh) for entry in spec]
    except ValueError as error:
        raise ValueError(f"sharding rule for {name!r}: {error}.") from None
    for dim, entry in enumerate(entries):
        if entry is not None and shape[dim] % _axis_size(mesh, entry):
            raise ValueError(
                f"sharding rule for {name!r}: dimension {dim} of {shape} is not divisible by the "
                f"{entry!r} axis size {_axis_size(mesh, entry)}."
            )
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = ()) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) from ordered regex rules."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def leaf_sharding(path, leaf):
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, leaf_spec(name, tuple(leaf.shape), spec, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def put_on_mesh(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)` that also works when the mesh spans several processes.

    Every process must hold the same value of every leaf (numpy arrays, arrays on a local device,
    or global arrays); each process keeps only the pieces that its devices own.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf), sharding), impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of a batch into global arrays split over the batch axes.

    `host_batch` holds this process's `global_batch_size / process_count` examples (the data
    pipeline shards by process index); one process passes the whole batch.
    """
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in host_batch.items()
    }
