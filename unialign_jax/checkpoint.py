"""The only module that talks to Orbax.

One `StageCheckpointer` per stage folder. A checkpoint holds three items:
- `state`: the TrainState pytree (params, frozen, quantizer, aux, opt_state, carry, rng, step);
- `data`: the grain iterator position, so a resumed run sees exactly the batches it would have seen;
- `meta`: JSON (stage name and index, codebook active/capacity, modalities, config hash, versions,
  `finished`), readable without building the model (`read_meta`).
Saves are atomic (Orbax commits a step only when complete), so an interrupted save never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


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


class StageCheckpointer:
    """Orbax CheckpointManager for one stage: periodic saves, latest-N retention, resume."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
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

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """Restores onto `abstract_state`'s shapes and shardings; advances `data_iterator` in place."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.meta

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, step: int | None = None) -> tuple[Any, dict]:
        """Restores the stored state as saved (no target: stored shapes, single-device arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def save_tree(directory: str, tree: Any) -> None:
    """Saves a pytree of arrays (e.g. EWC Fisher + anchors) atomically to `directory`."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree)
    checkpointer.wait_until_finished()


def load_tree(directory: str) -> Any:
    """Loads a pytree saved by `save_tree`, with its stored shapes."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No saved tree at {directory}.")
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory))
