"""The UniAlign train step: modality-aware gradient accumulation over per-modality micro-batches.

One optimizer update per cycle (`papers/unialign.txt` §3.3, "Batching Strategy"): the mixed batch
holds every encoded modality (`data.mixed`); for each modality m, in config order, and for each of
its `accumulation.steps` micro-batches, the step runs the forward pass, the loss and the gradient of
that micro-batch alone; the gradients are accumulated and AdamW updates once:

    g = sum_m  (1 / A) sum_{a=1..A}  grad L_m(micro-batch a of m),

L_m = Eq. 16 on the micro-batch (`modality_loss`). Modalities are summed (each modality's backward
pass adds into the same gradient buffer, as `loss.backward()` per modality does), micro-batches of
one modality averaged (the usual accumulation: A micro-batches weigh as one batch). Contrastive and
KL terms see only their own micro-batch: accumulation here is not equivalent to one large batch
(open_clip's feature caching would make it so; the paper does not say it uses it).

Everything runs inside ONE `jax.jit` (state donated, batch sharded on the data axes): a static
Python loop over modalities (their shapes differ) and a `lax.scan` over each modality's micro-batches.
Only `TrainState.params` (adapters, tokenizers, heads, logit scale) is differentiated; the frozen
backbone lives in `TrainState.frozen` and never changes. The class-label text embeddings are
read-only `TrainState.carry['label_embeddings']`.

Terms of L_m (each switch in `config.loss.terms`; tau = `config.loss.temperature`):
  nce           InfoNCE(e_m, anchor) with the learned logit scale; anchor = the caption's text
                embedding ('caption') or the class-label embedding ('label').
  soft_bind     mean over the other datasets n of soft_modality_binding_loss(e_m, y, Y_m, Y_n, tau):
                Eq. 11 summed over dataset pairs, each micro-batch contributing its own directions,
                divided by the number of other datasets.
  anchor_distil Eq. 12 with the two anchor views the data has: the class-label text (T) and the
                caption (I); the frozen anchor-anchor similarities guide the modality's.
  model_distil  Eq. 15: the MSE (Eq. 13) between the distillation head's (normalised) output and the
                cached teacher feature; the KLs (Eq. 14) between the student's similarities (its
                embedding vs the NCE anchor) and the teacher's (its feature vs its own embedding of
                the anchor view, `teacher_anchor`, or the NCE anchor when the teacher was trained
                against the student's anchors and caches none: `unialign_jax.methods.unialign.teachers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from unialign_jax import optim
from unialign_jax.loop import JittedStep, TrainState
from unialign_jax.losses import unialign as unialign_losses
from unialign_jax.losses.contrastive import info_nce, l2_normalize
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import label_embeddings as label_lib


def split_modality_batch(batch: dict[str, jax.Array], modality: str, steps: int) -> dict[str, jax.Array]:
    """{f'{modality}/{field}': [A·b, ...]} -> {field: [A, b, ...]}: micro-batch a holds rows a, A + a,
    2A + a, ... (strided, so every micro-batch draws evenly from every data-parallel shard)."""
    prefix = f"{modality}/"
    fields = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
    return {
        name: jnp.swapaxes(value.reshape(value.shape[0] // steps, steps, *value.shape[1:]), 0, 1)
        for name, value in fields.items()
    }


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


class UniAlignStep(JittedStep):
    """The jitted UniAlign train step of a stage (module docstring)."""

    def __init__(self, config, stage, mesh, abstract_state, state_shardings):
        self.model = config_lib.build_model(config)
        self.modalities = config_lib.encoded_modalities(config)
        self.teacher_modalities = config_lib.teacher_modalities(config)
        super().__init__(config, stage, mesh, abstract_state, state_shardings)

    def modality_loss(
        self, params: dict, state: TrainState, micro_batch: dict[str, jax.Array], modality: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Eq. 16 on one micro-batch of one modality: {inputs, label[, text][, teacher]} -> (L_m, metrics)."""
        loss_config = self.config.loss
        terms_on = loss_config.terms
        tau, kl_order = loss_config.temperature, loss_config.kl_order
        outputs = self.model.apply({"params": optim.merge_params(params, state.frozen)}, micro_batch["inputs"], modality)
        embedding = outputs["embedding"]
        labels = micro_batch["label"]
        class_embeddings = state.carry["label_embeddings"]
        label_anchor = class_embeddings[modality][labels]
        caption = label_lib.pool_text(micro_batch["text"]) if "text" in micro_batch else None
        anchor = caption if loss_config.nce_anchor == "caption" else label_anchor

        terms, metrics = {}, {}
        terms["nce"], nce_metrics = info_nce(embedding, anchor, outputs["log_logit_scale"])
        metrics["nce_accuracy"] = nce_metrics["accuracy_a_to_b"]
        metrics["logit_scale"] = nce_metrics["logit_scale"]
        if terms_on.soft_bind:
            others = [m for m in self.modalities if m != modality]
            terms["soft_bind"] = sum(
                unialign_losses.soft_modality_binding_loss(
                    embedding, labels, class_embeddings[modality], class_embeddings[other], tau, kl_order
                )
                for other in others
            ) / len(others)
        if terms_on.anchor_distil:
            terms["anchor_distil"] = unialign_losses.anchor_distillation_loss(
                embedding, label_anchor, caption, tau, kl_order
            )
        if modality in self.teacher_modalities:
            terms["model_distil"], distil_metrics = unialign_losses.model_distillation_loss(
                {modality: embedding, "anchor": anchor},
                {modality: micro_batch["teacher"], "anchor": micro_batch.get("teacher_anchor", anchor)},
                modality,
                "anchor",
                mse_weight=loss_config.feature_mse_weight,
                temperature=tau,
                kl_order=kl_order,
                student_feature=l2_normalize(outputs["distillation"]),
            )
            metrics.update(distil_metrics)
        total, terms = unialign_losses.unialign_total_loss(terms, dict(loss_config.weights))
        return total, {**terms, **metrics, "total": total}

    def modality_gradients(self, state: TrainState, batch: dict, modality: str) -> tuple[dict, dict]:
        """(1 / A) sum over modality's A micro-batches of grad L_m, and the micro-batch-mean metrics."""
        steps = self.config.accumulation.steps
        micro_batches = split_modality_batch(batch, modality, steps)
        grad_fn = jax.value_and_grad(self.modality_loss, has_aux=True)

        def accumulate(summed, micro_batch):
            (_, metrics), grads = grad_fn(state.params, state, micro_batch, modality)
            return _add(summed, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        summed, metrics = jax.lax.scan(accumulate, zeros, micro_batches)
        return jax.tree.map(lambda g: g / steps, summed), jax.tree.map(jnp.mean, metrics)

    def gradients(self, state: TrainState, batch: dict) -> tuple[dict, dict[str, jax.Array]]:
        """Modality-aware gradient accumulation: sum over modalities of `modality_gradients`.

        Metrics: '<modality>/<term>' per modality, 'loss/<term>' and 'loss/total' summed over modalities.
        """
        grads, metrics = None, {}
        for modality in self.modalities:
            modality_grads, modality_metrics = self.modality_gradients(state, batch, modality)
            grads = modality_grads if grads is None else _add(grads, modality_grads)
            for name, value in modality_metrics.items():
                metrics[f"{modality}/{name}"] = value
                if name in (*unialign_losses.UNIALIGN_LOSS_TERMS, "total"):
                    metrics[f"loss/{name}"] = metrics.get(f"loss/{name}", 0.0) + value
        return grads, metrics

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grads, metrics = self.gradients(state, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
