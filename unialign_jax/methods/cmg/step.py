"""The CMG/COMET train step (one `jax.jit`, state donated, batch sharded on the mesh's data axes).

In the reference's order (CMG `pretrain.py`):
1. forward pass of the model with the codebook's MM-EMA update and dead-code restarts (the
   `quantizer` collection), kept as a `jax.vjp` so the model runs once;
2. the CLUB estimators' inner loop (`club.steps` Adam steps on stop-gradient inputs, their own
   optimizer state in `TrainState.aux`);
3. the total loss on the model outputs with the updated CLUB nets (plus, with a stage-start
   mediator snapshot in the carry, the mediator's feature distillation), its gradient pulled back
   through the forward pass, plus the EWC penalty's gradient (COMET stages > 1);
4. per-group gradient clipping and the Adam update (`optim.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax.loop import JittedStep, StageSpec, TrainState, state_shardings
from unialign_jax.losses import cmg as cmg_losses
from unialign_jax.losses import continual as continual_losses
from unialign_jax.losses.objective import cmg_objective
from unialign_jax.methods.cmg import model as model_lib
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


def _tree_global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


class CMGStep(JittedStep):
    """The CMG/COMET train step (module docstring)."""

    def __init__(self, config, stage, mesh, abstract_state, state_shardings):
        self.model, self.club = model_lib.build_models(config, stage)
        super().__init__(config, stage, mesh, abstract_state, state_shardings)

    # -- pieces of the step ---------------------------------------------------------------------------

    def _club_inner_loop(self, aux: dict, quantized: list[dict], specific: list[dict]) -> tuple[dict, jax.Array]:
        """`club.steps` Adam steps maximising the CLUB log-likelihood on stop-gradient inputs, summed
        over the stage's groups (one dict per group)."""
        xs = jax.lax.stop_gradient(quantized)
        ys = jax.lax.stop_gradient(specific)
        tx = model_lib.club_optimizer(self.config)

        def negative_loglik(club_params):
            total = 0.0
            for x, y in zip(xs, ys):
                estimates = self.club.apply({"params": club_params}, x)
                total = total - sum(cmg_losses.club_log_likelihood(*estimates[m], y[m]) for m in x)
            return total

        def one_step(_, carry):
            params, opt_state, _ = carry
            loss, grads = jax.value_and_grad(negative_loglik)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params, opt_state, loss = jax.lax.fori_loop(
            0, self.config.club.steps, one_step, (aux["club_params"], aux["club_opt_state"], jnp.zeros(()))
        )
        return {"club_params": params, "club_opt_state": opt_state}, -loss

    def _group_inputs(self, batch: dict) -> list[dict]:
        """{modality: inputs} of each group of the stage: the whole batch for a one-group stage; for a
        stage of several groups (`StageSpec.pairs`), group (lead, partners...) reads the mixed batch's
        `{lead}/inputs` and `{lead}/{partner}` (`data.mixed`)."""
        if not self.stage.pairs:
            return [{m: batch[m] for m in self.stage.modalities}]
        return [{group[0]: batch[f"{group[0]}/inputs"], **{m: batch[f"{group[0]}/{m}"] for m in group[1:]}}
                for group in self.stage.pairs]

    def _mediator_teacher_features(self, state: TrainState, inputs: dict) -> jax.Array | None:
        """The mediator's semantic features [B, T, D] from its stage-start snapshot
        (`carry['mediator_teacher']`, see `continual.mediator_snapshot`), or None without one."""
        snapshot = state.carry.get("mediator_teacher")
        if snapshot is None:
            return None
        mediator = self.stage.mediator
        return jax.lax.stop_gradient(self.model.apply(
            {"params": snapshot}, inputs[mediator], mediator, method=cmg_nn.CMGModel.semantic_features))

    def _pseudo_modality(self, state: TrainState, all_params: dict, mediator_features: jax.Array) -> dict | None:
        """COMET Pseudo-Modality Replay participant for Cross-CPC, or None outside PMR stages.

        `mediator_features` [B, T, D]: the live mediator's semantic features, or the stage-start
        snapshot's (`continual.pmr_teacher='frozen'`)."""
        teacher = state.carry.get("teacher")
        if teacher is None or not self.stage.mediator:
            return None
        if mediator_features is None:
            raise ValueError("continual.pmr_teacher='frozen' needs the stage-start mediator snapshot "
                             "carry['mediator_teacher'], which this state lacks.")
        sequence, on_new = quantizer_lib.pseudo_modality_sequence(
            jax.lax.stop_gradient(mediator_features),
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

    def gradients(self, state: TrainState, batch: dict, *, with_protection: bool = True
                  ) -> tuple[dict, jax.Array, dict, dict]:
        """(parameter gradients, loss, metrics, updated non-parameter state) of one batch; no update.

        `with_protection=False` leaves out what protects the earlier stages (the EWC penalty and the
        mediator's feature distillation): the Fisher estimate measures this stage's loss alone.

        The updated state holds `quantizer` (after MM-EMA and restarts), `aux` (after the CLUB inner
        loop), `rng` and the batch's `codes`. Used by the train step and by the Fisher estimate.
        """
        config, stage = self.config, self.stage
        rng, dropout_rng, quantizer_rng, cpc_rng, perm_rng = jax.random.split(state.rng, 5)
        groups = stage.pairs or (stage.modalities,)
        inputs = self._group_inputs(batch)
        teacher_features = self._mediator_teacher_features(state, inputs[0])
        live_replay = config.continual.get("pmr_teacher", "live") == "live"
        distill_weight = config.continual.get("mediator_distillation", 0.0) if with_protection else 0.0

        def group_key(key, index):  # group 0 keeps the key, so a one-group stage is unchanged
            return key if index == 0 else jax.random.fold_in(key, index)

        def forward(params):
            all_params = optim.merge_params(params, state.frozen)
            quantizer, differentiable, rest = state.quantizer, [], []
            for index, group_inputs in enumerate(inputs):  # each group's MM-EMA sees the one before's codebook
                outputs, mutated = self.model.apply(
                    {"params": all_params, "quantizer": quantizer},
                    group_inputs,
                    train=True,
                    update_codebook=True,
                    rngs={"dropout": group_key(dropout_rng, index), "quantizer": group_key(quantizer_rng, index)},
                    mutable=["quantizer"],
                )
                quantizer = mutated["quantizer"]
                differentiable.append({k: outputs[k] for k in DIFFERENTIABLE_OUTPUTS if k in outputs})
                rest.append({k: v for k, v in outputs.items() if k not in differentiable[-1]})
            pseudo = None
            if stage.mediator:  # one group (validated)
                semantic = differentiable[0]["semantic"][stage.mediator]
                pseudo = self._pseudo_modality(state, all_params, semantic if live_replay else teacher_features)
            if pseudo is not None:
                differentiable[0]["pseudo_predictions"] = pseudo.pop("predictions")
            return differentiable, (rest, pseudo, quantizer)

        differentiable, pullback, (rest, pseudo, new_quantizer) = jax.vjp(forward, state.params, has_aux=True)
        aux, club_loglik = self._club_inner_loop(
            state.aux, [d["quantized"] for d in differentiable], [d["specific"] for d in differentiable]
        )

        batch_size, seq_len = inputs[0][groups[0][0]].shape[:2]
        time_index = cmg_losses.sample_cpc_time_index(cpc_rng, seq_len, config.model.cpc_prediction_steps)
        club_permutations = [cmg_losses.sample_club_permutations(group_key(perm_rng, index), batch_size, group)
                             for index, group in enumerate(groups)]

        def group_loss(index, diff):
            estimates = self.club.apply({"params": aux["club_params"]}, diff["quantized"])
            extra = None
            if pseudo is not None:
                extra = dict(pseudo, predictions=diff["pseudo_predictions"])
            return cmg_objective(
                {**diff, **rest[index]},
                estimates,
                inputs[index],
                modalities=groups[index],
                weights=config.loss.weights,
                commitment_beta=config.loss.commitment_beta,
                cpc_time_index=time_index,
                club_permutations=club_permutations[index],
                cpc_normalize_over=config.loss.cpc_normalize_over,
                cpc_cross_weight=config.loss.cpc_cross_weight,
                cpc_self_weight=config.loss.cpc_self_weight,
                cpc_extra=extra,
            )

        def loss_fn(diffs):
            """Σ over the groups of their CMG objectives (+ the mediator distillation)."""
            if len(diffs) == 1:
                loss, metrics = group_loss(0, diffs[0])
            else:
                metrics = _sum_group_metrics([group_loss(i, d)[1] for i, d in enumerate(diffs)], groups)
                loss = metrics["loss/total"]
            if teacher_features is not None and distill_weight:
                distill = continual_losses.feature_distillation_loss(diffs[0]["semantic"][stage.mediator],
                                                                     teacher_features)
                metrics["loss/distill"] = distill
                loss = loss + distill_weight * distill
            return loss, metrics

        (loss, metrics), cotangent = jax.value_and_grad(loss_fn, has_aux=True)(differentiable)
        (grads,) = pullback(cotangent)

        ewc = state.carry.get("ewc")
        if ewc is not None and with_protection:
            penalty, ewc_grads = jax.value_and_grad(
                lambda p: continual_losses.ewc_penalty(
                    p, ewc["anchor"], ewc["fisher"], config.continual.ewc_strength
                )
            )(state.params)
            grads = jax.tree.map(jnp.add, grads, ewc_grads)
            metrics["loss/ewc"] = penalty
            loss = loss + penalty
        metrics.update({"loss/total": loss, "club/loglik": club_loglik})
        codes = [r["codes"] for r in rest]
        return grads, loss, metrics, {"quantizer": new_quantizer, "aux": aux, "rng": rng, "codes": codes}

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grads, loss, metrics, updated = self.gradients(state, batch)
        new_quantizer = updated["quantizer"]
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        used = jnp.zeros(new_quantizer["quantizer"]["embedding"].shape[0], bool)
        for codes in (c for group_codes in updated["codes"] for c in group_codes.values()):
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


def _sum_group_metrics(group_metrics: list[dict], groups: tuple[tuple[str, ...], ...]) -> dict:
    """One stage's metrics from its groups': the `loss/*` terms summed, every other metric under
    `{group}/` (e.g. `audio_text/cpc/accuracy_audio_from_text`)."""
    merged = {}
    for group, metrics in zip(groups, group_metrics):
        for key, value in metrics.items():
            if key.startswith("loss/"):
                merged[key] = merged.get(key, 0.0) + value
            else:
                merged[f"{'_'.join(group)}/{key}"] = value
    return merged


def estimate_fisher(config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, mesh,
                    patterns: list[str]) -> dict:
    """Diagonal empirical Fisher of this stage's loss for the parameters `patterns` select.

    F = (1/N) Σ_n (∂L_n/∂θ)², N = `fisher_batches` · batch_size / `fisher_micro_batch_size`, L_n the
    full stage objective on micro-batch n (`losses.continual.empirical_fisher`; its CMCM and
    Cross-CPC terms are contrastive over the micro-batch, so per-example gradients are not defined).
    The earlier stages' EWC penalty and the mediator distillation are left out. Micro-batch n uses
    the dropout / codebook randomness of `fold_in(state.rng, n)`. The state is not changed.
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = state_shardings(abstract, mesh, config.sharding_rules)
    step_fn = CMGStep(config, stage, mesh, abstract, shardings)
    micro = config.continual.fisher_micro_batch_size
    per_batch = config.batch_size // micro

    def micro_gradient(state, micro_batch):
        index = micro_batch.pop("index")
        grads = step_fn.gradients(state.replace(rng=jax.random.fold_in(state.rng, index)), micro_batch,
                                  with_protection=False)[0]
        return optim.split_params(grads, patterns)[0]

    @jax.jit
    def batch_fisher(state, batch, first_index):
        micro_batches = {k: v.reshape(per_batch, micro, *v.shape[1:]) for k, v in batch.items()}
        micro_batches["index"] = first_index + jnp.arange(per_batch)
        return continual_losses.empirical_fisher(lambda mb: micro_gradient(state, dict(mb)), micro_batches)

    iterator = model_lib.train_iterator(config, stage, seed_offset=1000)
    total = None
    for index in range(config.continual.fisher_batches):
        fisher = batch_fisher(state, parallel.global_batch(next(iterator), mesh), index * per_batch)
        total = fisher if total is None else jax.tree.map(jnp.add, total, fisher)
    return jax.tree.map(lambda f: f / config.continual.fisher_batches, total)
