"""The UniAlign model of a run: its modules, the frozen pretrained backbone, the step-0 state, random
batches of the training layout, and parameter counts by group."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from unialign_jax import optim
from unialign_jax.logs import logger
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import label_embeddings as label_lib
from unialign_jax.nn import weights as weights_lib
from unialign_jax.nn.transformer import TransformerConfig
from unialign_jax.nn.unialign import UniAlignModel, pretrained_bert_params


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of every encoded modality (for `init` / `eval_shape`)."""
    shapes = config.model.input_shapes
    return {m: jnp.zeros((batch_size, *shapes[m]), jnp.float32) for m in config_lib.encoded_modalities(config)}


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Freshly initialised parameters of every module (backbone random; see `pretrained_params`)."""
    model = config_lib.build_model(config)
    return model.init(rng, example_inputs(config), method=UniAlignModel.init_all)["params"]


def _check_architecture(config: ml_collections.ConfigDict, imported: TransformerConfig, source: str) -> None:
    expected = TransformerConfig(**dict(config.model.transformer))
    if imported != expected:
        raise ValueError(f"config.model.transformer {expected} does not match the weights in {source}: {imported}")


def pretrained_params(config: ml_collections.ConfigDict) -> dict | None:
    """The frozen weights to overlay on fresh params, from `config.model.backbone_weights`.

    'minilm': all-MiniLM-L6-v2 (`anchors.minilm_path`, else `weights.locate_or_download_minilm`);
    a `.safetensors` / `.npz` path: BERT or CLIP-vision weights of `config.model.backbone`
    (for CLIP, the image tokenizer also gets CLIP's patch embedding); '': none (random backbone, for
    tests only).
    """
    model = config.model
    if not model.backbone_weights:
        logger.warning("config.model.backbone_weights is empty: the frozen backbone is RANDOM (tests only).")
        return None
    if model.backbone == "bert":
        if model.backbone_weights == "minilm":
            source = weights_lib.locate_or_download_minilm(config.anchors.minilm_path or None)
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


def fresh_state(config: ml_collections.ConfigDict, stage: StageSpec) -> TrainState:
    """The starting state: fresh adapters, tokenizers and heads around the frozen pretrained backbone."""
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    params = jax.jit(functools.partial(init_params, config))(init_rng)
    pretrained = pretrained_params(config)
    if pretrained is not None:
        params = weights_lib.overlay_pretrained(params, pretrained)
    label_embeddings = label_lib.label_embeddings(config, config_lib.encoded_modalities(config))
    logger.info("UniAlign parameters:\n%s", parameter_table(config))
    return initial_state(config, stage, params, label_embeddings, state_rng)


def random_batch(config: ml_collections.ConfigDict, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays with the keys and shapes of one `data.train_iterator` batch (benchmarks, tests):
    labels in [0, num_classes), captions if the loss reads them, teacher features if distilled (and
    the teacher's anchor features when its width differs from the anchor's)."""
    rng = np.random.default_rng(seed)
    shapes = config.model.input_shapes
    batch = {}
    for modality, rows in config_lib.rows_per_update(config).items():
        fields = {"inputs": (rows, *shapes[modality])}
        if config_lib.uses_captions(config):
            fields[config.model.anchor] = (rows, *shapes[config.model.anchor])
        if modality in config_lib.teacher_modalities(config):
            fields["teacher"] = (rows, config.teachers.dims[modality])
            if config.teachers.dims[modality] != shapes[config.model.anchor][-1]:
                fields["teacher_anchor"] = fields["teacher"]
        for name, shape in fields.items():
            batch[f"{modality}/{name}"] = rng.standard_normal(shape).astype(np.float32)
        batch[f"{modality}/label"] = rng.integers(0, num_classes, rows).astype(np.int32)
    return batch


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
