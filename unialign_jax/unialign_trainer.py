"""The UniAlign train step (modality-aware gradient accumulation over per-modality micro-batches) and
what `trainer.train_stage` needs besides it: the initial state (`fresh_state`), the mixed-modality
batches (`make_train_iterator`); plus parameter counts by group (`parameter_table`).

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
                against the student's anchors and caches none: `unialign_jax.teachers`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from unialign_jax import anchors as anchors_lib
from unialign_jax import optim
from unialign_jax import teachers as teachers_lib
from unialign_jax import unialign_config
from unialign_jax.data import mixed
from unialign_jax.logs import logger
from unialign_jax.losses import unialign as unialign_losses
from unialign_jax.losses.contrastive import info_nce, l2_normalize
from unialign_jax.nn import weights as weights_lib
from unialign_jax.nn.transformer import TransformerConfig
from unialign_jax.nn.unialign import UniAlignModel, pretrained_bert_params
from unialign_jax import trainer
from unialign_jax.trainer import StageSpec, TrainState


def build_model(config: ml_collections.ConfigDict) -> UniAlignModel:
    return UniAlignModel(unialign_config.model_config(config), dtype=jnp.dtype(config.model.dtype))


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of every encoded modality (for `init` / `eval_shape`)."""
    shapes = config.model.input_shapes
    return {m: jnp.zeros((batch_size, *shapes[m]), jnp.float32) for m in unialign_config.encoded_modalities(config)}


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Freshly initialised parameters of every module (backbone random; see `pretrained_params`)."""
    model = build_model(config)
    return model.init(rng, example_inputs(config), method=UniAlignModel.init_all)["params"]


def _check_architecture(config: ml_collections.ConfigDict, imported: TransformerConfig, source: str) -> None:
    expected = TransformerConfig(**dict(config.model.transformer))
    if imported != expected:
        raise ValueError(f"config.model.transformer {expected} does not match the weights in {source}: {imported}")


def pretrained_params(config: ml_collections.ConfigDict) -> dict | None:
    """The frozen weights to overlay on fresh params, from `config.model.backbone_weights`.

    'minilm': all-MiniLM-L6-v2 (`anchors.minilm_path`, else located or downloaded as the digits data
    does); a `.safetensors` / `.npz` path: BERT or CLIP-vision weights of `config.model.backbone`
    (for CLIP, the image tokenizer also gets CLIP's patch embedding); '': none (random backbone, for
    tests only).
    """
    model = config.model
    if not model.backbone_weights:
        logger.warning("config.model.backbone_weights is empty: the frozen backbone is RANDOM (tests only).")
        return None
    if model.backbone == "bert":
        if model.backbone_weights == "minilm":
            from unialign_jax.data.digits import captions  # pylint: disable=import-outside-toplevel

            source = captions.locate_or_download_minilm(config.anchors.minilm_path or None)
            weights = weights_lib.load_minilm(source, scan_layers=model.scan_layers).weights
        else:
            source = model.backbone_weights
            weights = weights_lib.load_bert(
                source, num_heads=model.transformer.num_heads, scan_layers=model.scan_layers,
                layer_norm_epsilon=model.transformer.layer_norm_epsilon, activation=model.transformer.activation)
        _check_architecture(config, weights.config, str(source))
        return {"backbone": pretrained_bert_params(weights.params)}
    weights = weights_lib.load_clip_vision(
        model.backbone_weights, activation=model.transformer.activation, scan_layers=model.scan_layers,
        layer_norm_epsilon=model.transformer.layer_norm_epsilon)
    _check_architecture(config, weights.config, model.backbone_weights)
    pretrained = {"backbone": weights.backbone}
    if model.tokenizers.get("image", {}).get("kind") == "image":
        pretrained["tokenizer_image"] = weights.tokenizer
    return pretrained


def initial_state(config: ml_collections.ConfigDict, stage: StageSpec, params: dict,
                  label_embeddings: dict[str, jax.Array], rng: jax.Array) -> TrainState:
    """The state at step 0 of `params` (all modules; the backbone part is frozen by
    `config.frozen_patterns`), the class-label text embeddings {modality: [C, D]} and the step's key."""
    frozen, trainable = optim.split_params(params, config.frozen_patterns)
    tx = optim.make_optimizer(config.optim, trainable, stage.steps)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        frozen=frozen,
        quantizer={},
        aux={},
        opt_state=tx.init(trainable),
        carry={"label_embeddings": {m: jnp.asarray(v) for m, v in label_embeddings.items()}},
        rng=rng,
    )


def fresh_state(config: ml_collections.ConfigDict, stage: StageSpec, workdir: str) -> TrainState:
    """The starting state: fresh adapters, tokenizers and heads around the frozen pretrained backbone."""
    del workdir  # the state does not depend on the workdir (teacher features come with the data)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    params = jax.jit(functools.partial(init_params, config))(init_rng)
    pretrained = pretrained_params(config)
    if pretrained is not None:
        params = weights_lib.overlay_pretrained(params, pretrained)
    label_embeddings = anchors_lib.label_embeddings(config, unialign_config.encoded_modalities(config))
    logger.info("UniAlign parameters:\n%s", parameter_table(config))
    return initial_state(config, stage, params, label_embeddings, state_rng)


def random_batch(config: ml_collections.ConfigDict, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays with the keys and shapes of one `make_train_iterator` batch (benchmarks, tests):
    labels in [0, num_classes), captions if the loss reads them, teacher features if distilled (and
    the teacher's anchor features when its width differs from the anchor's)."""
    rng = np.random.default_rng(seed)
    shapes = config.model.input_shapes
    batch = {}
    for modality, rows in unialign_config.rows_per_update(config).items():
        fields = {"inputs": (rows, *shapes[modality])}
        if unialign_config.uses_captions(config):
            fields[config.model.anchor] = (rows, *shapes[config.model.anchor])
        if modality in unialign_config.teacher_modalities(config):
            fields["teacher"] = (rows, config.teachers.dims[modality])
            if config.teachers.dims[modality] != shapes[config.model.anchor][-1]:
                fields["teacher_anchor"] = fields["teacher"]
        for name, shape in fields.items():
            batch[f"{modality}/{name}"] = rng.standard_normal(shape).astype(np.float32)
        batch[f"{modality}/label"] = rng.integers(0, num_classes, rows).astype(np.int32)
    return batch


def make_train_iterator(config: ml_collections.ConfigDict, stage: StageSpec, workdir: str):
    """Mixed-modality batches (`data.mixed`): per modality `accumulation.steps` micro-batches' rows,
    its captions when the loss reads them, and its cached teacher features (`teachers`)."""
    batch_sizes = unialign_config.rows_per_update(config)
    encoded = tuple(batch_sizes)
    fields = {m: (config.model.anchor,) for m in encoded} if unialign_config.uses_captions(config) else {}
    teacher_features = teachers_lib.load_teachers(config, workdir) if config.loss.terms.model_distil else {}
    return mixed.make_mixed_iterator(
        stage.data,
        modalities=encoded,
        batch_sizes=batch_sizes,
        seed=config.seed,
        fields=fields,
        extra=teacher_features,
    )


# --------------------------------------------------------------------------------------------------
# Parameter counts.


def parameter_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts by trainable group (`config.optim.groups`) plus 'frozen', from shapes only
    (`jax.eval_shape`: no weights are read and nothing is allocated)."""
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    frozen, trainable = optim.split_params(shapes, config.frozen_patterns)
    labels = traverse_util.flatten_dict(optim.group_labels(trainable, config.optim.groups), sep="/")
    counts = {name: 0 for name, _ in config.optim.groups}
    for path, leaf in traverse_util.flatten_dict(trainable, sep="/").items():
        counts[labels[path]] += int(np.prod(leaf.shape))
    counts["frozen"] = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(frozen))
    return counts


def parameter_table(config: ml_collections.ConfigDict) -> str:
    """Human-readable `parameter_counts`: trainable groups, trainable total, frozen backbone."""
    counts = parameter_counts(config)
    trainable = sum(v for k, v in counts.items() if k != "frozen")
    rows = [(name, count) for name, count in counts.items() if name != "frozen"]
    rows += [("trainable total", trainable), ("frozen (backbone)", counts["frozen"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {count:>12,d}  ({count / 1e6:.3f}M)" for name, count in rows)


# --------------------------------------------------------------------------------------------------
# The step.


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


class UniAlignStep(trainer.JittedStep):
    """The jitted UniAlign train step of a stage (module docstring)."""

    def __init__(self, config, stage, mesh, abstract_state, state_shardings):
        self.model = build_model(config)
        self.modalities = unialign_config.encoded_modalities(config)
        self.teacher_modalities = unialign_config.teacher_modalities(config)
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
        caption = anchors_lib.pool_text(micro_batch["text"]) if "text" in micro_batch else None
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
        self.trace_count += 1
        grads, metrics = self.gradients(state, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

