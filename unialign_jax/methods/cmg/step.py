"""The CMG/COMET train step (one `jax.jit`, state donated, batch sharded on the mesh's data axes).

In the reference's order (CMG `pretrain.py`):
1. forward pass of the model with the codebook's MM-EMA update and dead-code restarts (the
   `quantizer` collection), kept as a `jax.vjp` so the model runs once;
2. the CLUB estimators' inner loop (`club.steps` Adam steps on stop-gradient inputs, their own
   optimizer state in `TrainState.aux`);
3. the total loss on the model outputs with the updated CLUB nets, its gradient pulled back through
   the forward pass, plus the EWC penalty's gradient (COMET stages > 1);
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

    def _club_inner_loop(self, aux: dict, quantized: dict, specific: dict) -> tuple[dict, jax.Array]:
        """`club.steps` Adam steps maximising the CLUB log-likelihood on stop-gradient inputs."""
        x = jax.lax.stop_gradient(quantized)
        y = jax.lax.stop_gradient(specific)
        tx = model_lib.club_optimizer(self.config)

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

    def gradients(self, state: TrainState, batch: dict, *, with_ewc: bool = True
                  ) -> tuple[dict, jax.Array, dict, dict]:
        """(parameter gradients, loss, metrics, updated non-parameter state) of one batch; no update.

        `with_ewc=False` leaves out the earlier stages' EWC penalty (the Fisher estimate measures
        this stage's loss alone).

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
        club_permutations = cmg_losses.sample_club_permutations(perm_rng, batch_size, stage.modalities)

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
                club_permutations=club_permutations,
                cpc_normalize_over=config.loss.cpc_normalize_over,
                cpc_cross_weight=config.loss.cpc_cross_weight,
                cpc_self_weight=config.loss.cpc_self_weight,
                cpc_extra=extra,
            )

        (loss, metrics), cotangent = jax.value_and_grad(loss_fn, has_aux=True)(differentiable)
        (grads,) = pullback(cotangent)

        ewc = state.carry.get("ewc")
        if ewc is not None and with_ewc:
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


def estimate_fisher(config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, mesh,
                    patterns: list[str]) -> dict:
    """Diagonal empirical Fisher F_i ≈ E[(∂L/∂θ_i)²] of the stage loss over `fisher_batches` batches.

    L is the full stage objective on a batch (its CMCM and Cross-CPC terms are contrastive over the
    batch, so per-example gradients are not defined); F is the mean over batches of the squared batch
    gradient of this stage's loss alone (the earlier stages' EWC penalty is left out), for the
    parameters `patterns` select. The state is not changed.
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = state_shardings(abstract, mesh, config.sharding_rules)
    step_fn = CMGStep(config, stage, mesh, abstract, shardings)

    @jax.jit
    def squared_gradients(state, batch):
        grads = step_fn.gradients(state, batch, with_ewc=False)[0]
        return jax.tree.map(jnp.square, optim.split_params(grads, patterns)[0])

    iterator = model_lib.train_iterator(config, stage, seed_offset=1000)
    total = None
    for _ in range(config.continual.fisher_batches):
        squared = squared_gradients(state, parallel.global_batch(next(iterator), mesh))
        total = squared if total is None else jax.tree.map(jnp.add, total, squared)
    return jax.tree.map(lambda f: f / config.continual.fisher_batches, total)
