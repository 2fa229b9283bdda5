"""Config schema of UniAlign runs (`config.method = 'unialign'`): shared defaults, the ablation switches
of the paper's Tables 8 and 10, the model config, and validation before anything compiles.

A UniAlign config has ONE stage (the paper's single training phase) whose `data` maps every encoded
modality to its own dataset (a data config of `unialign_jax.data.pipeline`); each modality is paired
only with its anchor (text: captions and class labels), never with another encoded modality.

    config.method            'unialign'
    config.batch_size        examples per optimizer update, all modalities: accumulation.steps x
                             sum(accumulation.micro_batch_sizes)
    config.accumulation      steps: micro-batches per modality per update; micro_batch_sizes: {modality: b}
    config.model             modalities (all, anchor included), anchor ('text'), input_shapes,
                             backbone ('bert' | 'clip'), backbone_weights ('minilm', a weights file,
                             or '' = random: tests only), transformer (architecture), tokenizers
                             {modality: {kind, options...}}, embed_dim, modality_heads, adapter {num_experts
                             (per modality), routing, top_k, rank, alpha, placement}, clip_output_dim, bert_max_positions,
                             bert_type_vocab_size, scan_layers, remat, dtype
    config.frozen_patterns   regex table of the parameters that do not train (the backbone)
    config.optim             AdamW and per-group clipping (`optim.py`); groups must cover every
                             trainable parameter
    config.loss              terms {nce, soft_bind, anchor_distil, model_distil: bool} (Table 10),
                             weights (Eq. 16's alphas), temperature (tau of Eq. 10), kl_order,
                             feature_mse_weight (lambda of Eq. 15), nce_anchor ('caption' | 'label')
    config.anchors           class-label text embeddings: source ('minilm_prompts' | 'text_centroids'
                             | 'file'), templates {modality: '... {name} ...'}, file, minilm_path, cache_dir
    config.teachers          model-distillation teachers: modalities, dir, auto_train, dims, training
                             settings, optional data {modality: data config} to train on
                             (`unialign_jax.methods.unialign.teachers`)
    config.stages            [one stage: name, modalities, data {modality: data config}, steps]
    config.eval              data {modality: data config} (test split), batch_size, max_examples,
                             zero_shot_ks, retrieval_ks
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from unialign_jax import configlib
from unialign_jax import optim
from unialign_jax.configlib import ConfigError
from unialign_jax.data import pipeline
from unialign_jax.data.pipeline import MODALITIES
from unialign_jax.losses.unialign import UNIALIGN_LOSS_TERMS
from unialign_jax.nn.transformer import ADAPTER_PLACEMENTS, TransformerConfig
from unialign_jax.nn.unialign import TOKENIZER_KINDS, TokenizerSpec, UniAlignConfig, UniAlignModel

ANCHOR_SOURCES = ("minilm_prompts", "text_centroids", "file")
NCE_ANCHORS = ("caption", "label")

# The frozen backbone, as an explicit table (everything else trains: adapters, tokenizers, heads,
# the logit scale). Paths are '/'-joined parameter names of `nn.unialign.UniAlignModel`.
FROZEN_BACKBONE = (
    r"^backbone/(input|class_embedding|pre_norm|post_norm|projection)(/|$)",
    r"^backbone/encoder/[^/]+/(attention|attention_norm|mlp_norm)/",
    r"^backbone/encoder/[^/]+/mlp/(fc1|fc2)/",
)
# Trainable parameter groups (each clipped to its own norm); every trainable parameter must match one.
TRAINABLE_GROUPS = (
    ("adapters", r"^backbone/.*(_adapter|/adapter)/"),
    ("tokenizers", r"^tokenizer_"),
    ("heads", r"^(head_|distill_head_)"),
    ("logit_scale", r"^log_logit_scale$"),
)


def parse_ablation_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The shared arg-string switches plus a config's own `defaults`.

    Table 8 (routing): `routing=grouped|global`, `experts=N` per modality (global routing shares a
    pool of N x modalities experts: the same total), `top_k=K` (0 or >= experts = dense). Table 10 (objectives): `soft_bind`, `anchor_distil`,
    `model_distil` = true|false (L_NCE is always on). Also `steps=N` (0 = the config's default), `seed=N`.
    """
    return configlib.parse_arg(
        arg,
        steps=0,
        seed=0,
        routing="grouped",
        experts=2,
        top_k=2,
        soft_bind=True,
        anchor_distil=True,
        model_distil=True,
        **defaults,
    )


def base_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Defaults shared by the UniAlign configs (paper §3.3 and §4.1 where they apply), with `arg`'s
    ablation switches applied. The caller fills model (backbone, shapes, tokenizers), data and stages."""
    c = ml_collections.ConfigDict()
    c.method = "unialign"
    c.seed = arg.seed
    c.mesh = [("data", -1)]
    c.sharding_rules = []
    c.frozen_patterns = list(FROZEN_BACKBONE)
    c.log_every = 25
    c.checkpoint = dict(every=500, max_to_keep=2)
    c.writers = "jsonl"  # comma-separated: jsonl, tensorboard, wandb (`unialign_jax.writers`)
    c.profile = dict(start_step=10, num_steps=0)  # num_steps > 0: a JAX profiler trace into workdir/profile/
    c.accumulation = dict(steps=1, micro_batch_sizes={})
    c.batch_size = 0
    c.model = dict(
        modalities=(),
        anchor="text",
        input_shapes={},
        backbone="clip",
        backbone_weights="",
        transformer={},
        tokenizers={},
        embed_dim=512,
        modality_heads=True,
        adapter=dict(
            num_experts=arg.experts, routing=arg.routing, top_k=arg.top_k, rank=4, alpha=32.0, placement="ffn_linears"
        ),
        clip_output_dim=None,
        bert_max_positions=512,
        bert_type_vocab_size=2,
        scan_layers=False,
        remat=False,
        dtype="float32",
    )
    c.optim = optim.optimizer_config("adamw", 2e-4, weight_decay=0.05, schedule="warmup_cosine", clip_norm=1.0,
                                     groups=TRAINABLE_GROUPS)
    c.loss = dict(
        terms=dict(nce=True, soft_bind=arg.soft_bind, anchor_distil=arg.anchor_distil, model_distil=arg.model_distil),
        weights={name: 1.0 for name in UNIALIGN_LOSS_TERMS},
        temperature=0.07,
        kl_order="model_first",
        feature_mse_weight=2000.0,
        nce_anchor="caption",
    )
    c.anchors = dict(source="minilm_prompts", templates={}, file="", minilm_path="", cache_dir="")
    c.teachers = dict(
        modalities=(),
        dir="teachers",
        auto_train=False,
        dims={},
        steps=600,
        learning_rate=1e-3,
        hidden_dim=256,
        batch_size=128,
    )
    c.eval = dict(data={}, batch_size=256, max_examples=0, zero_shot_ks=(1, 5), retrieval_ks=(1, 5, 10))
    return c


def unialign_stage(name: str, modalities, data: dict, steps: int) -> ml_collections.ConfigDict:
    """The single training stage (the trainer's `StageSpec` fields; no codebook)."""
    return configlib.stage(name, tuple(modalities), ml_collections.ConfigDict(data), steps=steps, codebook_rows=0)


def encoded_modalities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The modalities the backbone encodes (every modality but the anchor), in config order."""
    return tuple(m for m in config.model.modalities if m != config.model.anchor)


def rows_per_update(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{encoded modality: its rows in one batch}: `accumulation.steps` micro-batches of its size."""
    sizes = config.accumulation.micro_batch_sizes
    return {m: config.accumulation.steps * sizes[m] for m in encoded_modalities(config)}


def teacher_modalities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Modalities distilled from a teacher (empty when the model-distillation term is off)."""
    if not config.loss.terms.model_distil:
        return ()
    return tuple(m for m in encoded_modalities(config) if m in tuple(config.teachers.modalities))


def uses_captions(config: ml_collections.ConfigDict) -> bool:
    """Whether training reads each example's anchor text (captions): the NCE or anchor-distillation anchor."""
    return config.loss.nce_anchor == "caption" or bool(config.loss.terms.anchor_distil)


def model_config(config: ml_collections.ConfigDict) -> UniAlignConfig:
    """The `UniAlignConfig` (hashable module config) of a UniAlign run config."""
    model = config.model
    tokenizers = []
    for modality in encoded_modalities(config):
        options = dict(model.tokenizers[modality])
        kind = options.pop("kind")
        tokenizers.append((modality, TokenizerSpec(kind, tuple(sorted((k, _hashable(v)) for k, v in options.items())))))
    adapter = model.adapter
    # Grouped: `num_experts` per modality. Global: one shared pool of the same total size (Table 8
    # compares the two strategies at equal capacity), each modality's router choosing among all of it.
    pool = len(tokenizers) if adapter.routing == "global" else 1
    return UniAlignConfig(
        backbone=model.backbone,
        transformer=TransformerConfig(**dict(model.transformer)),
        tokenizers=tuple(tokenizers),
        embed_dim=model.embed_dim,
        num_experts=adapter.num_experts * pool,
        routing=adapter.routing,
        top_k=adapter.top_k,
        lora_rank=adapter.rank,
        lora_alpha=adapter.alpha,
        adapter_placement=adapter.placement,
        clip_output_dim=model.clip_output_dim,
        bert_max_positions=model.bert_max_positions,
        bert_type_vocab_size=model.bert_type_vocab_size,
        distillation_dims=tuple((m, int(config.teachers.dims[m])) for m in teacher_modalities(config)),
        modality_heads=model.modality_heads,
        scan_layers=model.scan_layers,
        remat=model.remat,
    )


def build_model(config: ml_collections.ConfigDict) -> UniAlignModel:
    """The UniAlign module of a run config."""
    return UniAlignModel(model_config(config), dtype=jnp.dtype(config.model.dtype))


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def validate(config: ml_collections.ConfigDict, dataset_modalities=pipeline.dataset_modalities) -> None:
    """Checks a UniAlign config before anything compiles; every error names the field.

    `dataset_modalities(data config) -> modalities` says what a dataset provides (raises ValueError
    on an unknown dataset); the default builds nothing."""
    configlib.check_run_fields(config)
    model = config.model
    modalities = tuple(model.modalities)
    for name in modalities:
        if name not in MODALITIES:
            raise ConfigError(f"config.model.modalities: unknown modality {name!r}; known: {', '.join(MODALITIES)}.")
    if model.anchor not in modalities:
        raise ConfigError(f"config.model.anchor: {model.anchor!r} is not in config.model.modalities {modalities}.")
    encoded = encoded_modalities(config)
    if not encoded:
        raise ConfigError("config.model.modalities: at least one modality besides the anchor is needed.")
    for name in encoded:
        if name not in model.tokenizers:
            raise ConfigError(f"config.model.tokenizers: no tokenizer for modality {name!r}.")
        kind = model.tokenizers[name].get("kind")
        if kind not in TOKENIZER_KINDS:
            raise ConfigError(f"config.model.tokenizers.{name}.kind: {kind!r} is not one of {tuple(TOKENIZER_KINDS)}.")
    for name in modalities:
        if name not in model.input_shapes:
            raise ConfigError(f"config.model.input_shapes: no shape for modality {name!r}.")
    if model.adapter.routing not in ("grouped", "global"):
        raise ConfigError(f"config.model.adapter.routing must be 'grouped' or 'global', got {model.adapter.routing!r}.")
    if model.adapter.placement not in ADAPTER_PLACEMENTS:
        raise ConfigError(f"config.model.adapter.placement must be one of {ADAPTER_PLACEMENTS}.")
    if not 0 <= model.adapter.top_k <= model.adapter.num_experts or model.adapter.num_experts < 1:
        raise ConfigError(
            f"config.model.adapter: need num_experts >= 1 and 0 <= top_k <= num_experts, got "
            f"{model.adapter.num_experts} experts, top_k {model.adapter.top_k}."
        )
    try:
        model_config(config)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"config.model: {error}") from error

    terms = config.loss.terms
    if unknown := sorted(set(terms) - set(UNIALIGN_LOSS_TERMS)):
        raise ConfigError(f"config.loss.terms: unknown terms {unknown}; known: {UNIALIGN_LOSS_TERMS}.")
    if not terms.nce:
        raise ConfigError("config.loss.terms.nce: L_NCE aligns the modalities and cannot be switched off.")
    if config.loss.nce_anchor not in NCE_ANCHORS:
        raise ConfigError(f"config.loss.nce_anchor must be one of {NCE_ANCHORS}, got {config.loss.nce_anchor!r}.")
    if terms.soft_bind and len(encoded) < 2:
        raise ConfigError("config.loss.terms.soft_bind binds datasets of different modalities: it needs two or more.")
    if config.loss.temperature <= 0:
        raise ConfigError(f"config.loss.temperature must be positive, got {config.loss.temperature}.")
    if terms.model_distil:
        if not teacher_modalities(config):
            raise ConfigError("config.teachers.modalities: the model-distillation term is on but no modality has a teacher.")
        missing = [m for m in teacher_modalities(config) if m not in config.teachers.dims]
        if missing:
            raise ConfigError(f"config.teachers.dims: no teacher feature size for {missing}.")
    if config.anchors.source not in ANCHOR_SOURCES:
        raise ConfigError(f"config.anchors.source must be one of {ANCHOR_SOURCES}, got {config.anchors.source!r}.")
    if config.anchors.source == "minilm_prompts":
        missing = [m for m in encoded if m not in config.anchors.templates]
        if missing:
            raise ConfigError(f"config.anchors.templates: no class-prompt template for {missing}.")
    if config.anchors.source == "file" and not config.anchors.file:
        raise ConfigError("config.anchors.file: anchors.source='file' needs the path of an .npz of class embeddings.")

    sizes = config.accumulation.micro_batch_sizes
    if missing := [m for m in encoded if m not in sizes]:
        raise ConfigError(f"config.accumulation.micro_batch_sizes: no micro-batch size for {missing}.")
    if config.accumulation.steps < 1 or any(sizes[m] < 1 for m in encoded):
        raise ConfigError("config.accumulation: steps and micro-batch sizes must be positive.")
    total = config.accumulation.steps * sum(sizes[m] for m in encoded)
    if config.batch_size != total:
        raise ConfigError(
            f"config.batch_size={config.batch_size} must equal accumulation.steps x sum(micro_batch_sizes) = {total}."
        )

    if len(config.stages) != 1:
        raise ConfigError(f"config.stages: UniAlign trains in one phase (one stage), got {len(config.stages)}.")
    stage = config.stages[0]
    if stage.steps <= 0:
        raise ConfigError(f"config.stages[0].steps must be positive, got {stage.steps}.")
    if set(stage.modalities) != set(modalities):
        raise ConfigError(f"config.stages[0].modalities {tuple(stage.modalities)} must be config.model.modalities {modalities}.")
    needs_text = uses_captions(config) or config.anchors.source == "text_centroids"
    for where, data in (("config.stages[0].data", stage.data), ("config.eval.data", config.eval.data)):
        for name in encoded:
            if name not in data:
                raise ConfigError(f"{where}: no dataset for modality {name!r}.")
            try:
                available = dataset_modalities(data[name])
            except ValueError as error:
                raise ConfigError(f"{where}.{name}: {error}") from error
            wanted = (name, model.anchor) if needs_text else (name,)
            if missing := [m for m in wanted if m not in available]:
                raise ConfigError(f"{where}.{name}: dataset {data[name].name!r} has no modality {missing}.")

