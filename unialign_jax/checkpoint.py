"""The only module that talks to Orbax.

One `StageCheckpointer` per stage folder. A checkpoint holds three items:
- `state`: the TrainState pytree (params, frozen, quantizer, aux, opt_state, carry, rng, step);
- `data`: the grain iterator position, so a resumed run sees exactly the batches it would have seen
  (one file per process: each process restores its own shard's position);
- `meta`: JSON (stage name and index, codebook active/capacity, modalities, config hash, versions,
  `finished`), readable without building the model (`read_meta`).
Saves are atomic (Orbax commits a step only when complete), so an interrupted save never leaves a
half-written checkpoint behind. A step damaged afterwards (truncated or deleted files) is found on
resume: `restore_latest_intact` falls back to the newest step that restores.

Paths are `etils.epath` paths: local directories and object stores (`gs://bucket/...`) alike.
Multi-host: every process calls `save`/`restore` (Orbax writes and reads the array shards
collectively; the primary process writes the metadata), and a restore places the arrays on the
shardings of the target it is given, which may come from a different mesh than the one that saved.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from unialign_jax import files
from unialign_jax.errors import UserError
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


class CheckpointError(UserError, RuntimeError):
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


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (all processes call this together)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


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
        `data_iterator` skips the iterator position. `CheckpointError` if the step cannot be read.
        """
        return self._at(step, lambda step: self._restore(step, abstract_state, data_iterator))

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def restore_latest_intact(self, abstract_state: Any, data_iterator: Any | None
                              ) -> tuple[int, Any, dict] | None:
        """`(step, state, meta)` of the newest step that restores (as `restore`); None without steps.

        Newer damaged steps (truncated or missing files) are logged and renamed
        `<step>.damaged-<time>`, so the resumed run can save those steps again; nothing is deleted.
        `CheckpointError` listing each step's failure when none restores (nothing is renamed then:
        the cause may be `abstract_state` rather than the files). All processes call it together and
        agree on each step; a file damaged for one process only (its iterator position or array
        shards) desynchronizes Orbax's own barriers, which stops the run instead.
        """
        found = self._newest(lambda step: self._restore(step, abstract_state, data_iterator), collective=True)
        if found is None:
            return None
        step, (state, meta), damaged = found
        self._set_aside(damaged)
        return step, state, meta

    def read_meta(self, step: int | None = None) -> dict | None:
        """`meta` of `step`, else of the newest step whose meta reads (damaged newer ones are logged).

        None without steps; `CheckpointError` when the meta of `step` (or of every step) is unreadable.
        """
        if step is not None:
            return self._at(step, self._read_meta)
        found = self._newest(self._read_meta, collective=False)
        return None if found is None else found[1]

    def _read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict]:
        """Restores the stored state with its stored shapes, without a target structure.

        The arrays come back fully replicated on `mesh` (default: `replicated_target`'s), whatever
        the mesh or the number of processes that saved them. `step` defaults to the latest, with no
        fallback (callers want the stage's final state): `CheckpointError` if it cannot be read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        return self._at(step, lambda step: self._restore_replicated(step, mesh))

    def _restore_replicated(self, step: int, mesh: jax.sharding.Mesh | None) -> tuple[Any, dict]:
        target = replicated_target(self._manager.item_metadata(step).state, mesh)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored.state, restored.meta

    def _at(self, step: int, read: Callable[[int], Any]) -> Any:
        """`read(step)`, with a failure raised as `CheckpointError` naming the step."""
        self.wait()
        try:
            return read(step)
        except Exception as error:
            raise CheckpointError(f"Cannot read step {step} of {self.directory}: {_reason(error)}") from error

    def _newest(self, read: Callable[[int], Any], *, collective: bool) -> tuple[int, Any, list[int]] | None:
        """`(step, read(step), newer damaged steps)` for the newest step `read` succeeds on.

        None without steps; `CheckpointError` when it fails on every step. `collective`: all
        processes call it and agree on each step.
        """
        self.wait()
        failures: dict[int, str] = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                result, reason = read(step), None
            except Exception as error:
                result, reason = None, _reason(error)
            if _on_every_process(reason is None) if collective else reason is None:
                return step, result, list(failures)
            failures[step] = reason or "unreadable on another process"
            logger.warning("Skipping unreadable checkpoint step %d in %s: %s", step, self.directory, failures[step])
        if failures:
            raise CheckpointError(f"No readable checkpoint in {self.directory}: "
                                  + "; ".join(f"step {step}: {reason}" for step, reason in failures.items()))
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames `steps` to `<step>.damaged-<time>` (process 0), a name Orbax does not list.

        On an object store a rename copies every file of the step.
        """
        if not steps:
            return
        if files.is_primary():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                target = (self.directory / str(step)).rename(self.directory / f"{step}.damaged-{stamp}")
                logger.warning("Moved damaged checkpoint step %d aside to %s.", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"unialign_jax set aside damaged steps in {self.directory}")
        self._manager.reload()

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
