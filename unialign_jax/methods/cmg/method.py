"""CMG, DCID and COMET behind the `Method` protocol (`unialign_jax.methods`).

One stage (CMG pre-training) or several (COMET/DCID, linked by a mediator): the stage's state comes
from `continual.initial_state`, the step is `step.CMGStep`, the batches are the stage's modalities
from its dataset, and after each stage `continual.finish_stage` saves the EWC Fisher and anchors.
"""

from __future__ import annotations

import jax
import ml_collections
from etils import epath
import numpy as np

from unialign_jax import report
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.methods.cmg import config as config_lib
from unialign_jax.methods.cmg import continual
from unialign_jax.methods.cmg.embed import CMGEmbedder
from unialign_jax.methods.cmg import evaluate
from unialign_jax.methods.cmg import model as model_lib
from unialign_jax.methods.cmg import step as step_lib


class CMGMethod:
    """CMG/DCID/COMET (`config.method = 'cmg'`)."""

    name = "cmg"
    step = step_lib.CMGStep

    def validate(self, config: ml_collections.ConfigDict) -> None:
        config_lib.validate(config)

    def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        del config, workdir  # nothing to precompute

    def initial_state(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str) -> TrainState:
        return continual.initial_state(config, stage, workdir)

    def train_iterator(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str):
        del workdir
        return model_lib.train_iterator(config, stage)

    def end_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, workdir: str,
                  mesh) -> None:
        continual.finish_stage(config, stage, state, workdir,
                               lambda patterns: step_lib.estimate_fisher(config, stage, state, mesh, patterns))

    def evaluate_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState,
                       results_dir: epath.Path, history: list[dict]) -> dict:
        return evaluate.evaluate_stage(config, stage, state, results_dir, history)

    def results_table(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        del config
        return evaluate.stage_table(history)

    def results_markdown(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        del config
        return report.stages_markdown(history)

    def random_state(self, config: ml_collections.ConfigDict, stage: StageSpec, key: jax.Array) -> TrainState:
        return model_lib.fresh_state(config, stage, key)

    def random_batch(self, config: ml_collections.ConfigDict, stage: StageSpec, seed: int) -> dict:
        """Random arrays with the keys and shapes of one training batch (benchmarks)."""
        rng = np.random.default_rng(seed)
        shapes = config.model.input_shapes

        def rows(modality):
            return rng.standard_normal((config.batch_size, *shapes[modality])).astype(np.float32)

        if stage.pairs:  # mixed batches (`model.train_iterator`)
            return {f"{group[0]}/{'inputs' if m == group[0] else m}": rows(m) for group in stage.pairs for m in group}
        batch = {m: rows(m) for m in stage.modalities}
        seq_len = shapes[stage.modalities[0]][0]
        batch["label"] = rng.integers(0, 10, (config.batch_size,)).astype(np.int32)
        batch["step_labels"] = rng.integers(0, 10, (config.batch_size, seq_len)).astype(np.int32)
        return batch

    def tokens_per_step(self, config: ml_collections.ConfigDict, stage: StageSpec, abstract_state) -> int:
        """Batch x time steps x modalities (summed over the groups of a stage of several)."""
        del abstract_state
        modalities = sum(len(group) for group in stage.pairs) or len(stage.modalities)
        return config.batch_size * config.model.input_shapes[stage.modalities[0]][0] * modalities

    def export_fields(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Every trained module (`frozen` holds the modules of modalities absent from the stage) and the
        codebook; not the CLUB estimators, optimizer states or keys (training only)."""
        del config
        return ("params", "frozen", "quantizer")

    def embedder(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState) -> CMGEmbedder:
        return CMGEmbedder(config, stage, state)

    def backbone_source(self, config: ml_collections.ConfigDict) -> str:
        del config
        return ""  # no pretrained backbone: an export holds every weight

    def frozen_backbone(self, config: ml_collections.ConfigDict, weights: str | None) -> dict:
        del config, weights
        return {}  # nothing is left out of an export


METHOD = CMGMethod()
