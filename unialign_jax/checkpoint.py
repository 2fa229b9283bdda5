"""The only module that talks to Orbax.

One `StageCheckpointer` per stage folder. A checkpoint holds three items:
- `state`: the TrainState pytree (params, frozen, quantizer, aux, opt_state, carry, rng, step);
- `data`: the grain iterator position, so a resumed run sees exactly the batches it would have seen
  (one file per process: each process restores its own shard's position);
- `meta`: JSON (stage name and index, codebook active/capacity, modalities, config hash, versions,
  `finished`), readable without building the model (`read_meta`).
Saves are atomic (Orbax commits a step only when complete), so an interrupted save never leaves a
half-written checkpoint behind.

Paths are `etils.epath` paths: local directories and object stores (`gs://bucket/...`) alike.
Multi-host: every process calls `save`/`restore` (Orbax writes and reads the array shards
collectively; the primary process writes the metadata), and a restore places the arrays on the
shardings of the target it is given, which may come from a different mesh than the one that saved.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import flax
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "unknown",
    }


def as_path(directory: epath.PathLike) -> epath.Path:
    """An absolute `epath.Path`: relative local paths are made absolute, `gs://...` stays as it is."""
    path = epath.Path(directory)
    return path if path.is_absolute() else path.absolute()


def replicated_target(metadata: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """ShapeDtypeStructs of stored arrays (from Orbax metadata), fully replicated on `mesh`.

    Without `mesh`: on the first device when there is one process, else replicated on every device.
    """
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    elif jax.process_count() == 1:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        sharding = jax.sharding.NamedSharding(
            jax.sharding.Mesh(jax.devices(), ("devices",)), jax.sharding.PartitionSpec())
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata)


class StageCheckpointer:
    """Orbax CheckpointManager for one stage: periodic saves, latest-N retention, resume."""

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 2):
        self.directory = as_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        """Saves `state`, the iterator position (unless None) and `meta` as step `step` (all processes)."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
        """Restores onto `abstract_state`'s shapes and shardings (any mesh); advances `data_iterator`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings; a None
        `data_iterator` skips the iterator position.
        """
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict]:
        """Restores the stored state with its stored shapes, without a target structure.

        The arrays come back fully replicated on `mesh` (default: `replicated_target`'s), whatever
        the mesh or the number of processes that saved them.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        target = replicated_target(self._manager.item_metadata(step).state, mesh)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_tree(directory: epath.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays (e.g. EWC Fisher + anchors) atomically to `directory` (all processes)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(as_path(directory), tree)
    checkpointer.wait_until_finished()


def load_tree(directory: epath.PathLike, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Loads a pytree saved by `save_tree` with its stored shapes, replicated as `replicated_target`."""
    path = as_path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"No saved tree at {path}.")
    checkpointer = ocp.StandardCheckpointer()
    return checkpointer.restore(path, replicated_target(checkpointer.metadata(path).item_metadata, mesh))
