"""The loop of ONE stage: mesh -> data -> init/resume -> jit step -> loop -> checkpoints.

The train step (one `jax.jit`, state donated, batch sharded on the mesh's data axes) does, in the
reference's order (CMG `pretrain.py`):
1. forward pass of the model with the codebook's MM-EMA update and dead-code restarts (the
   `quantizer` collection), kept as a `jax.vjp` so the model runs once;
2. the CLUB estimators' inner loop (`club.steps` Adam steps on stop-gradient inputs, their own
   optimizer state in `TrainState.aux`);
3. the total loss on the model outputs with the updated CLUB nets, its gradient pulled back through
   the forward pass, plus the EWC penalty's gradient (COMET stages > 1);
4. per-group gradient clipping and the Adam update (`optim.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import files
from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax.data import pipeline
from unialign_jax.logs import logger
from unialign_jax.losses import cmg as cmg_losses
from unialign_jax.losses import continual as continual_losses
from unialign_jax.losses.objective import cmg_objective
from unialign_jax.nn import cmg as cmg_nn
from unialign_jax.nn import quantizer as quantizer_lib

# Model outputs that carry gradients back to the parameters (the rest are codes and masks).
DIFFERENTIABLE_OUTPUTS = (
    "semantic",
    "quantized",
    "squared_distances",
    "specific",
    "reconstruction",
    "cpc_predictions",
    "router_probs",
)


@flax.struct.dataclass
class TrainState:
    """Everything one stage trains or carries; every field a pytree of arrays (DESIGN §3)."""

    step: jax.Array
    params: dict
    frozen: dict
    quantizer: dict
    aux: dict
    opt_state: Any
    carry: dict
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """The resolved description of one stage."""

    index: int
    name: str
    modalities: tuple[str, ...]
    mediator: str | None
    steps: int
    codebook_rows: int
    data: ml_collections.ConfigDict
    seen_modalities: tuple[str, ...]  # every modality of this and earlier stages, in config order
    replay_partner: str | None  # the previous stage's non-mediator modality (COMET PMR)

    @property
    def folder(self) -> str:
        return f"stage_{self.index + 1}_{self.name}"


def stage_specs(config: ml_collections.ConfigDict) -> list[StageSpec]:
    specs, seen = [], set()
    for i, s in enumerate(config.stages):
        seen.update(s.modalities)
        mediator = s.get("mediator") or None
        partner = None
        if i > 0 and mediator:
            partner = next(m for m in config.stages[i - 1].modalities if m != mediator)
        specs.append(StageSpec(
            index=i, name=s.name, modalities=tuple(s.modalities), mediator=mediator, steps=int(s.steps),
            codebook_rows=int(s.codebook_rows), data=s.data,
            seen_modalities=tuple(m for m in config.model.modalities if m in seen), replay_partner=partner))
    return specs


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


def _tree_global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


class JittedStep:
    """A stage's train step: one `jax.jit` (state donated, state and batch sharded) of `self._step`,
    with a trace counter (it must compile once per stage). Subclasses define `_step`."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        stage: StageSpec,
        mesh: jax.sharding.Mesh,
        abstract_state: TrainState,
        state_shardings: Any,
    ):
        self.config = config
        self.stage = stage
        self.trace_count = 0
        self.tx = optim.make_optimizer(config.optim, abstract_state.params, stage.steps)
        self._jitted = jax.jit(
            self._step,
            donate_argnums=(0,),
            in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
        )

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._jitted(state, batch)

    def lower(self, state, batch):
        return self._jitted.lower(state, batch)


class StepFunction(JittedStep):
    """The CMG/COMET train step (module docstring)."""

    def __init__(self, config, stage, mesh, abstract_state, state_shardings):
        self.model, self.club = build_models(config, stage)
        super().__init__(config, stage, mesh, abstract_state, state_shardings)

    # -- pieces of the step ---------------------------------------------------------------------------

    def _club_inner_loop(self, aux: dict, quantized: dict, specific: dict) -> tuple[dict, jax.Array]:
        """`club.steps` Adam steps maximising the CLUB log-likelihood on stop-gradient inputs."""
        x = jax.lax.stop_gradient(quantized)
        y = jax.lax.stop_gradient(specific)
        tx = club_optimizer(self.config)

        def negative_loglik(club_params):
            estimates = self.club.apply({"params": club_params}, x)
            return -sum(cmg_losses.club_log_likelihood(*estimates[m], y[m]) for m in x)

        def one_step(_, carry):
            params, opt_state, _ = carry
            loss, grads = jax.value_and_grad(negative_loglik)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params, opt_state, loss = jax.lax.fori_loop(
            0, self.config.club.steps, one_step, (aux["club_params"], aux["club_opt_state"], jnp.zeros(()))
        )
        return {"club_params": params, "club_opt_state": opt_state}, -loss

    def _pseudo_modality(self, state: TrainState, all_params: dict, semantic: dict) -> dict | None:
        """COMET Pseudo-Modality Replay participant for Cross-CPC, or None outside PMR stages."""
        teacher = state.carry.get("teacher")
        if teacher is None or not self.stage.mediator:
            return None
        sequence, on_new = quantizer_lib.pseudo_modality_sequence(
            jax.lax.stop_gradient(semantic[self.stage.mediator]),
            teacher["embedding"],
            teacher["active_count"],
            state.quantizer["quantizer"]["embedding"],
            teacher["active_count"],
            state.quantizer["quantizer"]["active_count"],
        )
        predictions = self.model.apply(
            {"params": all_params}, sequence, self.stage.replay_partner, method=cmg_nn.CMGModel.predict_future
        )
        weights = jnp.where(on_new, jnp.exp(-8.0), 1.0)
        return {
            "name": "pseudo",
            "semantic": sequence,
            "predictions": predictions,
            "position_weights": weights,
        }

    def gradients(self, state: TrainState, batch: dict) -> tuple[dict, jax.Array, dict, dict]:
        """(parameter gradients, loss, metrics, updated non-parameter state) of one batch; no update.

        The updated state holds `quantizer` (after MM-EMA and restarts), `aux` (after the CLUB inner
        loop), `rng` and the batch's `codes`. Used by the train step and by the Fisher estimate.
        """
        config, stage = self.config, self.stage
        rng, dropout_rng, quantizer_rng, cpc_rng, perm_rng = jax.random.split(state.rng, 5)
        inputs = {m: batch[m] for m in stage.modalities}

        def forward(params):
            all_params = optim.merge_params(params, state.frozen)
            outputs, mutated = self.model.apply(
                {"params": all_params, "quantizer": state.quantizer},
                inputs,
                train=True,
                update_codebook=True,
                rngs={"dropout": dropout_rng, "quantizer": quantizer_rng},
                mutable=["quantizer"],
            )
            pseudo = self._pseudo_modality(state, all_params, outputs["semantic"])
            differentiable = {k: outputs[k] for k in DIFFERENTIABLE_OUTPUTS if k in outputs}
            if pseudo is not None:
                differentiable["pseudo_predictions"] = pseudo.pop("predictions")
            rest = {k: v for k, v in outputs.items() if k not in differentiable}
            return differentiable, (rest, pseudo, mutated["quantizer"])

        differentiable, pullback, (rest, pseudo, new_quantizer) = jax.vjp(forward, state.params, has_aux=True)
        aux, club_loglik = self._club_inner_loop(
            state.aux, differentiable["quantized"], differentiable["specific"]
        )

        batch_size, seq_len = inputs[stage.modalities[0]].shape[:2]
        time_index = cmg_losses.sample_cpc_time_index(cpc_rng, seq_len, config.model.cpc_prediction_steps)
        permutation = jax.random.permutation(perm_rng, batch_size)

        def loss_fn(diff):
            estimates = self.club.apply({"params": aux["club_params"]}, diff["quantized"])
            extra = None
            if pseudo is not None:
                extra = dict(pseudo, predictions=diff["pseudo_predictions"])
            return cmg_objective(
                {**diff, **rest},
                estimates,
                inputs,
                modalities=stage.modalities,
                weights=config.loss.weights,
                commitment_beta=config.loss.commitment_beta,
                cpc_time_index=time_index,
                club_permutation=permutation,
                cpc_normalize_over=config.loss.cpc_normalize_over,
                cpc_cross_weight=config.loss.cpc_cross_weight,
                cpc_self_weight=config.loss.cpc_self_weight,
                cpc_extra=extra,
            )

        (loss, metrics), cotangent = jax.value_and_grad(loss_fn, has_aux=True)(differentiable)
        (grads,) = pullback(cotangent)

        ewc = state.carry.get("ewc")
        if ewc is not None:
            penalty, ewc_grads = jax.value_and_grad(
                lambda p: continual_losses.ewc_penalty(
                    p, ewc["anchor"], ewc["fisher"], config.continual.ewc_strength
                )
            )(state.params)
            grads = jax.tree.map(jnp.add, grads, ewc_grads)
            metrics["loss/ewc"] = penalty
            loss = loss + penalty
        metrics.update({"loss/total": loss, "club/loglik": club_loglik})
        return grads, loss, metrics, {"quantizer": new_quantizer, "aux": aux, "rng": rng, "codes": rest["codes"]}

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        self.trace_count += 1
        grads, loss, metrics, updated = self.gradients(state, batch)
        new_quantizer = updated["quantizer"]
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        used = jnp.zeros(new_quantizer["quantizer"]["embedding"].shape[0], bool)
        for codes in updated["codes"].values():
            used = used.at[codes.reshape(-1)].set(True)
        metrics.update(
            {
                "grad_norm": _tree_global_norm(grads),
                "param_norm": _tree_global_norm(params),
                "codebook/used_in_batch": used.sum(),
                "codebook/active": new_quantizer["quantizer"]["active_count"],
            }
        )
        new_state = state.replace(
            step=state.step + 1, params=params, quantizer=new_quantizer, aux=updated["aux"], opt_state=opt_state,
            rng=updated["rng"],
        )
        return new_state, metrics


def state_shardings(abstract_state: TrainState, mesh, rules) -> Any:
    return parallel.tree_shardings(abstract_state, mesh, rules)


class ProgressLog:
    """Console progress (step, losses, steps/s, ETA) and `metrics.jsonl` in the workdir (process 0)."""

    def __init__(self, workdir: str, stage: StageSpec, first_step: int):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.stage = stage
        self.first_step = first_step
        self.start = time.perf_counter()

    def write(self, step: int, metrics: dict) -> None:
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.stage.steps - step) / rate if rate > 0 else float("nan")
        scalars = {k: float(v) for k, v in metrics.items()}
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise FloatingPointError(f"Stage {self.stage.name!r} step {step}: metric {name} is {value}.")
        keys = ("loss/total", "loss/reconstruction", "loss/commitment", "loss/cmcm", "loss/cpc", "loss/club",
                "loss/nce", "loss/soft_bind", "loss/anchor_distil", "loss/model_distil")
        shown = " ".join(f"{k.split('/')[-1]}={scalars[k]:.4g}" for k in keys if k in scalars)
        logger.info(
            "[%s] step %d/%d %s | %.2f steps/s, ETA %s",
            self.stage.name,
            step,
            self.stage.steps,
            shown,
            rate,
            _format_seconds(eta),
        )
        record = {"stage": self.stage.name, "step": step, "steps_per_second": rate, **scalars}
        files.append_text(self.path, json.dumps(record) + "\n")


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def stage_meta(
    config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, finished: bool
) -> dict:
    config_json = config.to_json_best_effort(sort_keys=True)
    meta = {
        "stage": stage.name,
        "stage_index": stage.index,
        "modalities": list(stage.modalities),
        "mediator": stage.mediator,
        "steps": stage.steps,
        "finished": finished,
        "known_modalities": list(config.model.modalities),
        "config_hash": ckpt_lib.config_hash(config_json),
        "versions": ckpt_lib.library_versions(),
    }
    quantizer = state.quantizer.get("quantizer")
    if quantizer is not None:  # methods without a codebook (UniAlign) have an empty collection
        meta["codebook_active"] = int(quantizer["active_count"])
        meta["codebook_capacity"] = int(quantizer["embedding"].shape[0])
    return meta


def cmg_train_iterator(config: ml_collections.ConfigDict, stage: StageSpec):
    """The CMG/COMET training batches of a stage: its modalities from its dataset (`pipeline`)."""
    return pipeline.make_train_iterator(
        stage.data,
        modalities=stage.modalities,
        batch_size=config.batch_size,
        seed=config.seed + stage.index,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def train_stage(
    config: ml_collections.ConfigDict,
    stage: StageSpec,
    workdir: str,
    mesh,
    initial_state: Callable[[], TrainState],
    *,
    step_factory: Callable[..., Any] = StepFunction,
    iterator_factory: Callable[[ml_collections.ConfigDict, StageSpec], Any] = cmg_train_iterator,
) -> TrainState:
    """Runs (or resumes) one stage to completion and returns its final state.

    Args:
      initial_state: builds the stage's starting state (also when resuming: it gives the structure).
      step_factory: `(config, stage, mesh, abstract_state, state_shardings) -> step`, a jitted
        `step(state, batch) -> (state, metrics)` (default: the CMG/COMET `StepFunction`).
      iterator_factory: `(config, stage) -> iterator` of host batches with grain's checkpointable
        state (default: `cmg_train_iterator`).
    """
    checkpointer = ckpt_lib.StageCheckpointer(
        epath.Path(workdir) / stage.folder, max_to_keep=config.checkpoint.max_to_keep
    )
    state = initial_state()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = state_shardings(abstract, mesh, config.sharding_rules)
    state = parallel.put_on_mesh(state, shardings)
    data_iterator = iterator_factory(config, stage)

    latest = checkpointer.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, meta = checkpointer.restore(latest, target, data_iterator)
        logger.info("[%s] resumed from step %d%s.", stage.name, latest, " (finished)" if meta["finished"] else "")
        if meta["finished"]:
            checkpointer.close()
            return state

    step_fn = step_factory(config, stage, mesh, abstract, shardings)
    first = int(state.step)
    progress = ProgressLog(workdir, stage, first)
    for step in range(first + 1, stage.steps + 1):
        batch = parallel.global_batch(next(data_iterator), mesh)
        state, metrics = step_fn(state, batch)
        last = step == stage.steps
        if step % config.log_every == 0 or last:
            progress.write(step, jax.device_get(metrics))
        if step % config.checkpoint.every == 0 or last:
            checkpointer.save(step, state, data_iterator, stage_meta(config, stage, state, finished=last))
    checkpointer.wait()
    checkpointer.close()
    return state
