"""What passes between COMET stages: grown codebook, frozen modules, EWC Fisher/anchors, PMR teacher.

At the end of a stage (`finish_stage`) the diagonal empirical Fisher of the stage loss (mean of
squared micro-batch gradients, `step.estimate_fisher`) is estimated on that stage's data for the EWC
scope (`ewc_patterns`: the paper's CMoE-Adapter common layers and the specific layers of the stage's
modalities, COMET §3.2, Eq. 6; optionally the router and the mediator's encoder), logged with its
magnitude, added to the Fisher of earlier stages, and saved with the anchor parameters θ* and the
magnitude next to the stage's checkpoints (`<stage folder>/continual`).

At the start of stage s > 1 (`initial_state`) the next state is built from the previous stage's
final Orbax checkpoint:
- parameters: the previous ones, plus fresh modules for modalities that first appear now; modules of
  modalities absent from this stage are frozen (`model_lib.frozen_patterns`);
- codebook: the K_1 + ... + K_{s-1} learned codes and their EMA statistics copied bit-identically,
  K_s new codes appended. New rows are initialised from data: k-means (k-means++ seeding + Lloyd) on
  the mediator's semantic features of the new stage's data, computed with the trained mediator
  encoder. The mediator is the only trained encoder that sees the new data, and its features are
  where the new semantics (new classes, new captions) appear; the new modality's encoder is still
  random at the boundary. New rows start with the EMA weight of an average old code, so unused ones
  do not explode as the reference's tiny-uniform init does (reference notes §1.5, §2.3).
- owned codes (`continual.own_codes`, beyond the paper): the codes that modalities absent from this
  stage still use are marked `owned` in the codebook state, so this stage's MM-EMA and dead-code
  restarts leave them alone (`owned_codes`, `quantizer_lib` module docstring);
- carry: the EWC Fisher + anchors restricted to this stage's trainable parameters, the teacher
  codebook (a frozen copy of the previous codebook) for Pseudo-Modality Replay (§3.3), and, when
  `pmr_teacher='frozen'` or `mediator_distillation > 0`, the mediator snapshot (`mediator_snapshot`):
  a frozen copy of the mediator's semantic path as it is at the start of the stage.
The optimizer state restarts.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import traverse_util

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import loop
from unialign_jax import optim
from unialign_jax.data import pipeline
from unialign_jax.logs import logger
from unialign_jax.losses import continual as continual_losses
from unialign_jax.methods.cmg import model as model_lib
from unialign_jax.nn import cmg as cmg_nn
from unialign_jax.nn import quantizer as quantizer_lib

ARTIFACTS_FOLDER = "continual"


def ewc_patterns(config: ml_collections.ConfigDict, stage: loop.StageSpec) -> list[str]:
    """Parameters EWC protects after `stage`.

    The `paper` reading (COMET §3.2): the adapter's common layers + the specific layers the stage
    activated. `continual.ewc_router=True` adds the adapter's router, which every modality shares and
    which drifts with the experts (the paper leaves it out of the scope). `continual.ewc_extra`:
    further patterns beyond the paper, e.g. the mediator's semantic encoder, whose drift is what
    forgets earlier pairs; default none."""
    paper = [r"^adapter/common/"] + [rf"^adapter/specific_{m}/" for m in stage.modalities]
    router = [r"^adapter/router/"] if config.continual.get("ewc_router", False) else []
    return paper + router + list(config.continual.get("ewc_extra", ()))


def mediator_snapshot(stage: loop.StageSpec, params: dict) -> dict:
    """The mediator's semantic path in `params` (its video pooler, semantic encoder, the adapter's
    router, common and `specific_{mediator}` layers): a copy the next stage keeps frozen as the
    PMR teacher and the distillation target (`CMGModel.semantic_features` reads exactly these)."""
    mediator = re.escape(stage.mediator)
    patterns = [rf"^video_pooler_{mediator}/", rf"^semantic_encoder_{mediator}/", r"^adapter/router/",
                r"^adapter/common/", rf"^adapter/specific_{mediator}/"]
    return jax.tree.map(jnp.array, _select(params, patterns))


def uses_mediator_snapshot(config: ml_collections.ConfigDict, stage: loop.StageSpec) -> bool:
    """Whether `stage` carries a mediator snapshot: a PMR teacher read from it, or distillation."""
    if not stage.mediator:
        return False
    frozen_replay = (config.continual.pseudo_modality and stage.replay_partner is not None
                     and config.continual.get("pmr_teacher", "live") == "frozen")
    return frozen_replay or config.continual.get("mediator_distillation", 0.0) > 0


def _select(tree: dict, patterns: list[str]) -> dict:
    return optim.split_params(tree, patterns)[0]


def _accumulate(previous: dict, new: dict) -> dict:
    """Sum of two Fisher trees over the union of their paths."""
    flat = dict(traverse_util.flatten_dict(previous, sep="/"))
    for path, value in traverse_util.flatten_dict(new, sep="/").items():
        flat[path] = flat[path] + value if path in flat else value
    return traverse_util.unflatten_dict(flat, sep="/")


def finish_stage(config: ml_collections.ConfigDict, stage: loop.StageSpec, state: loop.TrainState,
                 workdir: str, estimate_fisher: Callable[[list[str]], dict]) -> None:
    """Saves the EWC Fisher (accumulated over stages) and anchors of a finished stage, once.

    `estimate_fisher(patterns)` is this stage's diagonal Fisher of the parameters `patterns` select
    (`step.estimate_fisher`)."""
    last_stage = stage.index == len(config.stages) - 1
    if not config.continual.ewc or last_stage:
        return
    directory = epath.Path(workdir) / stage.folder / ARTIFACTS_FOLDER
    if directory.is_dir():
        return
    micro_batches = config.continual.fisher_batches * config.batch_size // config.continual.fisher_micro_batch_size
    fisher = estimate_fisher(ewc_patterns(config, stage))
    magnitude = continual_losses.fisher_magnitude(fisher)
    logger.info("[%s] Fisher over %d micro-batches of %d: mean %.3g, max %.3g over the EWC scope "
                "(%d values).", stage.name, micro_batches, config.continual.fisher_micro_batch_size,
                float(magnitude["mean"]), float(magnitude["max"]), sum(v.size for v in jax.tree.leaves(fisher)))
    previous = state.carry.get("ewc", {}).get("fisher", {})
    all_params = optim.merge_params(state.params, state.frozen)
    anchor_patterns = [rf"^{re.escape(path)}$" for path in traverse_util.flatten_dict(
        _accumulate(previous, fisher), sep="/")]
    artifacts = {"fisher": _accumulate(previous, fisher), "anchor": _select(all_params, anchor_patterns),
                 "fisher_magnitude": magnitude}
    ckpt_lib.save_tree(directory, artifacts)


def initial_state(config: ml_collections.ConfigDict, stage: loop.StageSpec, workdir: str) -> loop.TrainState:
    """The starting state of `stage`: fresh for the first stage, else `next_stage_state`."""
    if stage.index == 0:
        return model_lib.fresh_state(config, stage, jax.random.key(config.seed))
    return next_stage_state(config, stage, workdir)


def _overlay(fresh: dict, previous: dict) -> dict:
    """`fresh` with every leaf that also exists in `previous` taken from `previous`."""
    flat = traverse_util.flatten_dict(fresh, sep="/")
    old = traverse_util.flatten_dict(previous, sep="/")
    for path, value in old.items():
        if path in flat:
            if flat[path].shape != value.shape:
                raise ValueError(f"Parameter {path!r} changed shape between stages: {value.shape} -> "
                                 f"{flat[path].shape}; the model config must not change across stages.")
            flat[path] = value
    return traverse_util.unflatten_dict(flat, sep="/")


def new_code_rows(config: ml_collections.ConfigDict, stage: loop.StageSpec, params: dict, quantizer: dict,
                  rng: jax.Array) -> jax.Array:
    """k-means rows from the mediator's semantic features on the new stage's data (module docstring)."""
    source = stage.mediator or stage.modalities[0]
    model, _ = model_lib.build_models(config, stage)
    data = pipeline.load_split(stage.data, "train", modalities=(source,),
                               max_examples=config.continual.growth_examples)
    outputs = jax.jit(lambda x: model.apply({"params": params, "quantizer": quantizer}, {source: x},
                                            train=False, update_codebook=False))(jnp.asarray(data[source]))
    features = outputs["semantic"][source].reshape(-1, config.model.semantic_dim)
    return quantizer_lib.init_codebook_rows_from_features(rng, features, stage.codebook_rows)


def codes_owned_by_share(codes: dict[str, jax.Array], capacity: int, min_share: float) -> jax.Array:
    """bool [C]: code k is owned when, for some modality m, n_mk / Σ_j n_mj >= `min_share`, n_mk the
    number of m's tokens (any shape of int codes in `codes[m]`) assigned to code k."""
    owned = jnp.zeros((capacity,), bool)
    for values in codes.values():
        counts = jnp.bincount(jnp.ravel(values), length=capacity)
        owned = owned | (counts / jnp.maximum(jnp.sum(counts), 1) >= min_share)
    return owned


def owned_codes(config: ml_collections.ConfigDict, stage: loop.StageSpec, params: dict, quantizer: dict
                ) -> jax.Array:
    """bool [C]: the codes that the modalities absent from `stage` still own at its start.

    For each absent modality (its encoder frozen in this stage), the first `growth_examples` training
    examples of the last earlier stage that had it are encoded with `params` and the codebook
    `quantizer` (the previous stage's final state); a code is owned when it receives at least
    `code_owner_min_share` of that modality's tokens (`codes_owned_by_share`)."""
    specs = loop.stage_specs(config)[:stage.index]
    absent = [m for m in stage.seen_modalities if m not in stage.modalities]
    model, _ = model_lib.build_models(config, stage)
    codes = {}
    for modality in absent:
        source = next(s for s in reversed(specs) if modality in s.modalities)
        source_data = next((d for group, d in zip(source.pairs, source.pair_data) if modality in group), source.data)
        data = pipeline.load_split(source_data, "train", modalities=(modality,),
                                   max_examples=config.continual.growth_examples)
        encoded = jax.jit(lambda x, m=modality: model.apply(
            {"params": params, "quantizer": quantizer}, {m: x}, method=cmg_nn.CMGModel.encode))(
                jnp.asarray(data[modality]))
        codes[modality] = encoded[modality][0]
    capacity = quantizer["quantizer"]["embedding"].shape[0]
    return codes_owned_by_share(codes, capacity, config.continual.code_owner_min_share)


def next_stage_state(config: ml_collections.ConfigDict, stage: loop.StageSpec, workdir: str
                     ) -> loop.TrainState:
    """The starting state of stage s > 1 from stage s-1's final checkpoint (module docstring)."""
    previous_stage = loop.stage_specs(config)[stage.index - 1]
    previous_dir = epath.Path(workdir) / previous_stage.folder
    checkpointer = ckpt_lib.StageCheckpointer(previous_dir)
    previous, meta = checkpointer.restore_state()
    checkpointer.close()
    if not meta.get("finished"):
        raise RuntimeError(f"{previous_dir} holds no finished checkpoint; stage {previous_stage.name!r} must finish "
                           f"before stage {stage.name!r} starts.")
    rng = jax.random.fold_in(jax.random.key(config.seed), stage.index)
    init_rng, rows_rng, state_rng = jax.random.split(rng, 3)
    fresh_params, _, fresh_club = model_lib.init_variables(config, stage, init_rng)
    params = _overlay(fresh_params, optim.merge_params(previous["params"], previous["frozen"]))
    club_params = _overlay(fresh_club, previous["aux"]["club_params"])

    old_codebook = previous["quantizer"]["quantizer"]
    owned = owned_codes(config, stage, params, previous["quantizer"]) if config.continual.own_codes else None
    grown = {k: v for k, v in old_codebook.items() if k != "owned"}
    if stage.codebook_rows:
        rows = new_code_rows(config, stage, params, previous["quantizer"], rows_rng)
        grown = quantizer_lib.grow_codebook(old_codebook, rows, capacity=config.quantizer.codebook_capacity)
    logger.info("[%s] codebook %d -> %d active codes (capacity %d).", stage.name,
                 int(old_codebook["active_count"]), int(grown["active_count"]), grown["embedding"].shape[0])
    if owned is not None:
        capacity = grown["embedding"].shape[0]
        grown["owned"] = jnp.zeros((capacity,), bool).at[:owned.shape[0]].set(owned)
        logger.info("[%s] %d codes owned by the absent modalities %s.", stage.name, int(owned.sum()),
                    [m for m in stage.seen_modalities if m not in stage.modalities])

    carry = {}
    if config.continual.pseudo_modality and stage.replay_partner:
        carry["teacher"] = {"embedding": jnp.asarray(old_codebook["embedding"]),
                            "active_count": jnp.asarray(old_codebook["active_count"])}
    if uses_mediator_snapshot(config, stage):
        carry["mediator_teacher"] = mediator_snapshot(stage, params)
    if config.continual.ewc:
        saved = ckpt_lib.load_tree(previous_dir / ARTIFACTS_FOLDER)
        trainable = optim.split_params(params, model_lib.frozen_patterns(config, stage))[1]
        keep = [rf"^{re.escape(p)}$" for p in traverse_util.flatten_dict(trainable, sep="/")]
        carry["ewc"] = {"fisher": _select(saved["fisher"], keep), "anchor": _select(saved["anchor"], keep)}
    state = model_lib.assemble_state(config, stage, params, {"quantizer": grown}, club_params, carry=carry,
                                   rng=state_rng)
    return jax.tree.map(jnp.asarray, state)
