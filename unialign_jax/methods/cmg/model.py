"""The CMG/COMET model of a stage: which modules exist, which train, and a fresh state.

A continual run grows its model stage by stage: the modules of a modality are created at the first
stage that has it (`stage_config`), and modules of modalities absent from a stage are frozen
(`frozen_patterns`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unialign_jax import optim
from unialign_jax.data import mixed, pipeline
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.nn import cmg as cmg_nn


def stage_config(config: ml_collections.ConfigDict, stage: StageSpec) -> ml_collections.ConfigDict:
    """The config of the model as it exists in `stage`: only the modalities seen so far.

    A modality that first appears in a later stage gets its modules (encoders, decoder, CPC head,
    CLUB net, adapter-specific layers) created at that stage's initialisation.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.modalities = stage.seen_modalities
    config.model.input_shapes = {m: config.model.input_shapes[m] for m in stage.seen_modalities}
    return config


def build_models(config: ml_collections.ConfigDict, stage: StageSpec) -> tuple[cmg_nn.CMGModel, cmg_nn.CLUBEstimators]:
    """The model and CLUB estimators of `stage` (modalities seen so far)."""
    model_config = cmg_nn.CMGModelConfig.from_config(stage_config(config, stage))
    return cmg_nn.CMGModel(model_config), cmg_nn.CLUBEstimators.for_model(model_config)


def frozen_patterns(config: ml_collections.ConfigDict, stage: StageSpec) -> list[str]:
    """Config patterns plus, in continual runs, every module of a modality absent from this stage."""
    absent = [m for m in stage.seen_modalities if m not in stage.modalities]
    return list(config.frozen_patterns) + [rf"_{m}(/|$)" for m in absent]


def club_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(config.club.learning_rate)


def init_variables(config: ml_collections.ConfigDict, stage: StageSpec, rng: jax.Array) -> tuple[dict, dict, dict]:
    """Fresh (params, quantizer collection, CLUB params) for every modality seen up to `stage`."""
    model, club = build_models(config, stage)
    model_rng, club_rng = jax.random.split(rng)
    inputs = {m: jnp.zeros((2, *config.model.input_shapes[m]), jnp.float32) for m in stage.seen_modalities}
    variables = model.init({"params": model_rng, "dropout": model_rng, "quantizer": model_rng}, inputs,
                           train=False, update_codebook=False)
    code_inputs = {m: jnp.zeros((2, config.model.input_shapes[m][0], config.model.semantic_dim))
                   for m in stage.seen_modalities}
    return variables["params"], variables["quantizer"], club.init(club_rng, code_inputs)["params"]


def fresh_state(config: ml_collections.ConfigDict, stage: StageSpec, rng: jax.Array) -> TrainState:
    """A from-scratch state (first stage), built under `jax.jit`."""

    def build():
        init_rng, state_rng = jax.random.split(rng)
        params, quantizer, club_params = init_variables(config, stage, init_rng)
        return assemble_state(config, stage, params, quantizer, club_params, carry={}, rng=state_rng)

    return jax.jit(build)()


def assemble_state(config: ml_collections.ConfigDict, stage: StageSpec, all_params: dict, quantizer: dict,
                   club_params: dict, *, carry: dict, rng: jax.Array) -> TrainState:
    """Splits parameters into trainable/frozen for `stage`; fresh optimizer states (DESIGN §4)."""
    frozen, params = optim.split_params(all_params, frozen_patterns(config, stage))
    tx = optim.make_optimizer(config.optim, params, stage.steps)
    aux = {"club_params": club_params, "club_opt_state": club_optimizer(config).init(club_params)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, quantizer=quantizer, aux=aux,
                      opt_state=tx.init(params), carry=carry, rng=rng)


def train_iterator(config: ml_collections.ConfigDict, stage: StageSpec, *, seed_offset: int = 0):
    """The CMG/COMET training batches of a stage: its modalities from its dataset (`pipeline`), shuffled
    with seed `config.seed + stage.index + seed_offset` (the Fisher estimate draws other batches).

    A stage of several groups (`stage.pairs`) gets mixed batches (`data.mixed`): each group (lead,
    partners...) is its own stream of `batch_size` rows of its dataset with its own shuffle, keyed
    `{lead}/inputs` and `{lead}/{partner}`, so modalities of different groups never share an example.
    """
    if stage.pairs:
        leads = [group[0] for group in stage.pairs]
        return mixed.make_mixed_iterator(
            dict(zip(leads, stage.pair_data)),
            modalities=leads,
            batch_sizes={lead: config.batch_size for lead in leads},
            seed=config.seed + stage.index + seed_offset,
            fields={group[0]: group[1:] for group in stage.pairs},
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    return pipeline.make_train_iterator(
        stage.data,
        modalities=stage.modalities,
        batch_size=config.batch_size,
        seed=config.seed + stage.index + seed_offset,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
