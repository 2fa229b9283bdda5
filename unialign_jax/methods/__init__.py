"""The method registry: `config.method` -> a `Method`, the one object the CLIs talk to.

A method is one folder (`methods/<name>/`) whose `method.py` defines `METHOD`, an object with the
`Method` protocol below; `loop.py` runs its stages and names no method. Built-in methods are imported
on first use (importing one never loads the others); `register` adds your own:

    from unialign_jax import methods
    methods.register("mine", MyMethod())      # then config.method = "mine"
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ml_collections
from etils import epath

from unialign_jax.configlib import ConfigError

if TYPE_CHECKING:
    import jax
    import numpy as np

    from unialign_jax.loop import JittedStep, StageSpec, TrainState

BUILTIN = {
    "cmg": "unialign_jax.methods.cmg.method",  # CMG, DCID and COMET
    "unialign": "unialign_jax.methods.unialign.method",
}
_REGISTERED: dict[str, Method] = {}


class Embedder(Protocol):
    """A trained stage's encoders (`Method.embedder`), behind `unialign_jax.load`."""

    modalities: tuple[str, ...]  # what `encode` accepts

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """The per-example input shape of `modality`."""

    def encode(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """float32[N, *input_shape] -> {'embedding': float32[N, D], ...the method's extras, e.g. 'codes'}."""

    def class_embeddings(self, modality: str, class_names: Sequence[str]) -> np.ndarray:
        """float32[C, D] to classify `modality`'s embeddings by cosine similarity (zero-shot); raises
        `inputs.InputError` saying why when the method cannot embed these names."""


class Method(Protocol):
    """What a training method provides to the CLIs and to `loop.train_stage`."""

    name: str
    step: type[JittedStep]  # (config, stage, mesh, abstract_state, state_shardings) -> the jitted step

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises `configlib.ConfigError` naming the field, before anything is written or compiled."""

    def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        """Builds what the run needs in its workdir before training (raises before writing if it can't)."""

    def initial_state(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str) -> TrainState:
        """The state at step 0 of `stage` (from the previous stage's checkpoint in continual runs)."""

    def train_iterator(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str) -> Any:
        """Host batches of `stage` with grain's checkpointable state."""

    def end_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, workdir: str,
                  mesh: Any) -> None:
        """Saves what later stages read (idempotent: a rerun finds it done)."""

    def evaluate_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState,
                       results_dir: epath.Path, history: list[dict]) -> dict:
        """{'name', 'modalities', 'metrics'} of a trained stage (its plots go to `results_dir`);
        `history` holds the earlier stages'."""

    def results_table(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        """The console table of the latest stage."""

    def results_markdown(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        """`summary.md` of the stages so far."""

    def random_state(self, config: ml_collections.ConfigDict, stage: StageSpec, key: jax.Array) -> TrainState:
        """A state of the stage's structure with random weights, reading no file (benchmarks)."""

    def random_batch(self, config: ml_collections.ConfigDict, stage: StageSpec, seed: int) -> dict:
        """Random host arrays with the keys and shapes of one training batch (benchmarks)."""

    def tokens_per_step(self, config: ml_collections.ConfigDict, stage: StageSpec, abstract_state: Any) -> int:
        """Tokens one step encodes (throughput)."""

    def export_fields(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The TrainState fields `unialign_jax.export` writes (trained weights; no optimizer state)."""

    def embedder(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState) -> Embedder:
        """The encoders of a trained state (only its `export_fields` and `frozen` are read)."""

    def backbone_source(self, config: ml_collections.ConfigDict) -> str:
        """The frozen pretrained weights an export leaves out and needs back ('' when it keeps everything)."""

    def frozen_backbone(self, config: ml_collections.ConfigDict, weights: str | None) -> dict:
        """The `frozen` params an export left out, read from `weights` (None: the config's own source);
        {} when `export_fields` holds `frozen`. Raises `inputs.InputError` naming the file."""


def register(name: str, method: Method) -> None:
    """Makes `method` available as `config.method = name`."""
    if name in BUILTIN or name in _REGISTERED:
        raise ValueError(f"a method named {name!r} is already registered.")
    _REGISTERED[name] = method


def names() -> tuple[str, ...]:
    return (*BUILTIN, *_REGISTERED)


def get(name: str) -> Method:
    """The method registered as `name`; `ConfigError` listing the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise ConfigError(f"config.method: unknown method {name!r}; known: {', '.join(names())}.")
    return importlib.import_module(BUILTIN[name]).METHOD


def for_config(config: ml_collections.ConfigDict) -> Method:
    """The method of a config (`config.method`)."""
    if "method" not in config:
        raise ConfigError(f"config.method is missing; set it to one of: {', '.join(names())}.")
    return get(config.method)
