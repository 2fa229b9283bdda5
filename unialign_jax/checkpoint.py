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

from unialign_jax.logs import logger


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


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or no checkpoint of a folder could be read."""


def _reason(error: BaseException) -> str:
    """`Type: first line of the message` of the exception at the root of `error`'s `raise ... from` chain."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# Step folders are created in `save` itself: created in the background, a failure there leaves the
# writers waiting minutes for the folder (and the interpreter waiting for them at exit).
_ASYNC_OPTIONS = ocp.options.AsyncOptions(create_directories_asynchronously=False)


def _finish_writes(checkpointer: ocp.AsyncCheckpointer) -> None:
    """Waits for the writes a failed save left running, ignoring their errors.

    Orbax raises at the first failed write; one still running at exit fails again ("cannot schedule
    new futures after shutdown"). Private attributes (Orbax 0.12): no public call waits for them.
    """
    for commit in checkpointer._async_manager._commit_futures or ():
        try:
            commit.result()
        except Exception:  # the first failure is the one reported
            pass


class StageCheckpointer:
    """Orbax CheckpointManager for one stage: periodic saves, latest-N retention, resume.

    Use it as a context manager (or call `close()` in a `finally`): leaving waits for the pending
    save, so an exception never leaves a half-written step behind. Save failures (a full disk)
    raise `CheckpointError` naming the folder and the step.

    Retention: Orbax picks the steps beyond `max_to_keep` when a save starts but deletes them only
    after the new step is committed, so a failed or interrupted save deletes nothing.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 2):
        if max_to_keep < 2:
            raise ValueError(f"max_to_keep must be at least 2 (got {max_to_keep}): resume falls back to the "
                             "previous checkpoint when the newest is damaged.")
        self.directory = as_path(directory)
        self._pending: int | None = None  # the step whose asynchronous save may still be running
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, async_options=_ASYNC_OPTIONS),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def __enter__(self) -> StageCheckpointer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Closes; while an exception propagates, a failed pending save is logged, not raised over it."""
        try:
            self.close()
        except CheckpointError as error:
            if exc is None:
                raise
            logger.error("%s (while stopping on %s)", error, exc_type.__name__)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        """Saves `state`, the iterator position (unless None) and `meta` as step `step` (all processes).

        Asynchronous: returns once the arrays are copied; `wait`, `close` or the next `save` raise
        `CheckpointError` if it fails.
        """
        self.wait()
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            self._save_failed(step, error)
        self._pending = step

    def wait(self) -> None:
        """Blocks until the pending save is committed; `CheckpointError` if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._save_failed(step, error)

    def _save_failed(self, step: int | None, error: Exception) -> None:
        """Raises `error` as `CheckpointError` once the failed save's other writes have stopped."""
        _finish_writes(self._manager._checkpointer)
        self._manager.reload()  # Orbax dropped the steps this save was to replace; they are still on disk
        raise CheckpointError(f"Saving step {step} to {self.directory} failed: {_reason(error)}") from error

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

    def close(self) -> None:
        """Waits for the pending save (`CheckpointError` if it failed) and stops Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()


def save_tree(directory: epath.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays (e.g. EWC Fisher + anchors) atomically to `directory` (all processes).

    `CheckpointError` naming `directory` if the save fails.
    """
    path = as_path(directory)
    checkpointer = ocp.StandardCheckpointer(async_options=_ASYNC_OPTIONS)
    try:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
    except Exception as error:
        _finish_writes(checkpointer)
        raise CheckpointError(f"Saving {path} failed: {_reason(error)}") from error
    finally:
        checkpointer.close()


def load_tree(directory: epath.PathLike, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Loads a pytree saved by `save_tree` with its stored shapes, replicated as `replicated_target`."""
    path = as_path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"No saved tree at {path}.")
    checkpointer = ocp.StandardCheckpointer()
    return checkpointer.restore(path, replicated_target(checkpointer.metadata(path).item_metadata, mesh))
