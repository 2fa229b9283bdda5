"""UniAlign model (`papers/unialign.txt` §3.1, Fig. 2): modality tokenizers -> ONE frozen pre-trained
transformer whose feed-forward networks carry modality-aware MoE-LoRA experts -> per-modality heads
into the anchor (text) embedding space.

    tokens_m    = tokenizer_m(x_m)                                   [B, L, width]   (trainable)
    pooled_m    = backbone(tokens_m, modality=m)                     [B, width or output_dim]
    embedding_m = pooled_m + head_m(pooled_m)                        [B, embed_dim]  (head_m starts at 0;
                                                                     without modality heads: pooled_m)
    distill_m   = embedding_m + distill_head_m(embedding_m)          [B, teacher dim] (modalities with a teacher)

Backbones (`UniAlignConfig.backbone`):

* "bert" (a text-pretrained encoder such as all-MiniLM-L6-v2, post-LN): BERT's input embedding without
  the word lookup, LN(tokens + position + token type 0) (`BertInput`, frozen), the encoder, and the
  mean over the tokens (sentence-transformers pooling). The paper argues that a transformer pretrained
  on one modality adapts to others; here the pretraining modality is text.
* "clip" (a CLIP vision tower, pre-LN, as the paper): `transformer.ClipBackbone`: class token,
  pre-norm, encoder, post-norm of the class token, CLIP's projection.

Every backbone parameter is meant to be frozen except the adapters (`.._adapter/..`, `../adapter/..`);
which parameters train is the config's regex table, not this module's business. The anchor modality
(text) is not encoded here: its embeddings are the frozen text encoder's (cached) outputs.

Head choice (the paper only says "projection head for knowledge distillation"): a head whose input and
output sizes agree is a residual linear map with a zero-initialised kernel, so an untrained model
outputs the frozen backbone's pooled features; otherwise it is a plain Dense.

Call: `model.apply(variables, inputs [B, ...], modality) -> {'embedding': [B, embed_dim],
'log_logit_scale': [], 'distillation': [B, teacher dim] (modalities with a teacher only)}`; the
MoE-LoRA routers sow their probabilities into 'intermediates' (ask with `mutable=['intermediates']`).
`model.init(rng, examples, method=UniAlignModel.init_all)` creates the parameters of every modality.
"""

from collections.abc import Mapping
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unialign_jax.nn import tokenizers as tokenizers_lib
from unialign_jax.nn.moe import MoELoRA
from unialign_jax.nn.transformer import ClipBackbone, Encoder, TransformerConfig, layer_norm, mean_pool

Array = jax.Array

BACKBONES = ("bert", "clip")
TOKENIZER_KINDS: dict[str, type[nn.Module]] = {
    "features": tokenizers_lib.FeatureTokenizer,
    "image": tokenizers_lib.ImageTokenizer,
    "video": tokenizers_lib.VideoTokenizer,
    "audio": tokenizers_lib.AudioTokenizer,
    "depth": tokenizers_lib.DepthTokenizer,
    "points": tokenizers_lib.PointCloudTokenizer,
}
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """One modality's tokenizer: a `TOKENIZER_KINDS` name and its keyword options (besides `width`)."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}; known: {tuple(TOKENIZER_KINDS)}")

    def build(self, width: int, dtype: Any, name: str) -> nn.Module:
        return TOKENIZER_KINDS[self.kind](width, **dict(self.options), dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class UniAlignConfig:
    """Everything that fixes the parameter shapes of a `UniAlignModel` (hashable: a module field).

    backbone: "bert" or "clip". transformer: the backbone's architecture. tokenizers: (modality, spec)
      for every modality the backbone encodes, in order: a modality's position is its expert-group
      id. embed_dim: size of the shared (anchor) embedding space.
    num_experts / routing / top_k / lora_rank / lora_alpha: the MoE-LoRA (`nn.moe.MoELoRA`; routing
      "grouped" = Eq. 5, "global" = Eq. 6; top_k 0 = dense). adapter_placement: "ffn_linears" or
      "parallel" (`nn.transformer`).
    clip_output_dim: CLIP's projection size (None: no projection). bert_max_positions /
      bert_type_vocab_size: sizes of BERT's frozen position and token-type tables.
    distillation_dims: (modality, teacher feature size) for the modalities with a distillation head.
    modality_heads: a trainable head per modality after the pooled features (else the embedding is
      the pooled features, which must then have `embed_dim` entries).
    """

    backbone: str
    transformer: TransformerConfig
    tokenizers: tuple[tuple[str, TokenizerSpec], ...]
    embed_dim: int
    num_experts: int = 2
    routing: str = "grouped"
    top_k: int = 0
    lora_rank: int = 4
    lora_alpha: float = 32.0
    adapter_placement: str = "ffn_linears"
    clip_output_dim: int | None = None
    bert_max_positions: int = 512
    bert_type_vocab_size: int = 2
    distillation_dims: tuple[tuple[str, int], ...] = ()
    modality_heads: bool = True
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not self.tokenizers:
            raise ValueError("a UniAlign model needs at least one tokenized modality")
        unknown = [m for m, _ in self.distillation_dims if m not in self.modalities]
        if unknown:
            raise ValueError(f"distillation heads for {unknown}, which have no tokenizer ({self.modalities})")
        if not self.modality_heads and self.pooled_dim != self.embed_dim:
            raise ValueError(f"without modality heads the pooled features ({self.pooled_dim}) must have "
                             f"embed_dim = {self.embed_dim} entries")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tokenizers)

    @property
    def pooled_dim(self) -> int:
        if self.backbone == "clip" and self.clip_output_dim is not None:
            return self.clip_output_dim
        return self.transformer.width


class BertInput(nn.Module):
    """BERT's input embedding without the word lookup: LN(tokens + position_embedding + token_type_0).

    Param names are those of `transformer.BertEmbeddings` (minus `word_embeddings`), so imported BERT
    weights fit: `position_embeddings/embedding` [P, D], `token_type_embeddings/embedding` [types, D],
    `norm/{scale,bias}`.
    """

    max_positions: int
    type_vocab_size: int
    layer_norm_epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        length, width = tokens.shape[-2:]
        if length > self.max_positions:
            raise ValueError(f"{length} tokens exceed the backbone's {self.max_positions} positions")
        embed = functools.partial(nn.Embed, features=width, dtype=self.dtype)
        x = (
            tokens.astype(self.dtype)
            + embed(self.max_positions, name="position_embeddings")(jnp.arange(length))
            + embed(self.type_vocab_size, name="token_type_embeddings")(jnp.zeros((), jnp.int32))
        )
        return layer_norm(self.layer_norm_epsilon, self.dtype, "norm")(x)


class BertBackbone(nn.Module):
    """`BertInput` -> encoder -> mean over tokens. Call: `(tokens [B, L, D], modality) -> [B, D]`."""

    encoder: Encoder
    max_positions: int
    type_vocab_size: int

    @nn.compact
    def __call__(self, tokens: Array, *, modality: str) -> Array:
        config = self.encoder.config
        x = BertInput(
            self.max_positions, self.type_vocab_size, config.layer_norm_epsilon, self.encoder.dtype, name="input"
        )(tokens)
        return mean_pool(self.encoder(x, modality=modality))


class ResidualHead(nn.Module):
    """x + Dense(x) with a zero-initialised kernel and bias when sizes agree (starts at the identity),
    else a plain Dense(features)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.features:
            return nn.Dense(self.features, dtype=self.dtype, name="projection")(x)
        delta = nn.Dense(
            self.features, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="projection"
        )(x)
        return x + delta


class UniAlignModel(nn.Module):
    """See the module docstring."""

    config: UniAlignConfig
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        adapter = functools.partial(
            MoELoRA,
            num_experts=config.num_experts,
            routing=config.routing,
            top_k=config.top_k,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
        )
        encoder = Encoder(
            config.transformer,
            adapter=adapter,
            adapter_placement=config.adapter_placement,
            modalities=config.modalities,
            scan_layers=config.scan_layers,
            remat=config.remat,
            dtype=self.dtype,
            parent=None,
        )
        if config.backbone == "bert":
            self.backbone = BertBackbone(encoder, config.bert_max_positions, config.bert_type_vocab_size)
        else:
            self.backbone = ClipBackbone(encoder, config.clip_output_dim)
        width = config.transformer.width
        self.tokenizers = {
            m: spec.build(width, self.dtype, name=f"tokenizer_{m}") for m, spec in config.tokenizers
        }
        if config.modality_heads:
            self.heads = {m: ResidualHead(config.embed_dim, self.dtype, name=f"head_{m}") for m in config.modalities}
        self.distill_heads = {
            m: ResidualHead(dim, self.dtype, name=f"distill_head_{m}") for m, dim in config.distillation_dims
        }
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.initializers.constant(CLIP_LOGIT_SCALE_INIT), (), jnp.float32
        )

    def __call__(self, inputs: Array, modality: str) -> dict[str, Array]:
        if modality not in self.tokenizers:
            raise ValueError(f"modality {modality!r} has no tokenizer; the model encodes {self.config.modalities}")
        tokens = self.tokenizers[modality](inputs)
        pooled = self.backbone(tokens, modality=modality)
        if isinstance(pooled, tuple):  # ClipBackbone also returns the token states
            pooled = pooled[0]
        embedding = self.heads[modality](pooled) if self.config.modality_heads else pooled
        outputs = {"embedding": embedding, "log_logit_scale": self.log_logit_scale}
        if modality in self.distill_heads:
            outputs["distillation"] = self.distill_heads[modality](embedding)
        return outputs

    def tokens(self, inputs: Array, modality: str) -> Array:
        """The token sequence [B, T, width] that `modality`'s tokenizer feeds the backbone."""
        return self.tokenizers[modality](inputs)

    def init_all(self, examples: Mapping[str, Array]) -> dict[str, dict[str, Array]]:
        """Runs every modality once (`examples`: {modality: [B, ...]}) so that `init` creates all params."""
        return {m: self(examples[m], m) for m in self.config.modalities}


def pretrained_bert_params(bert_params: Mapping[str, Any]) -> dict[str, Any]:
    """An imported BERT tree (`weights.BertWeights.params`) -> the `backbone` subtree of a "bert" model.

    Everything except the word embeddings: `input` <- `embeddings` (positions, token types, norm),
    `encoder` <- `encoder`. Overlay it with `weights.overlay_pretrained(params, {'backbone': ...})`.
    """
    embeddings = {k: v for k, v in bert_params["embeddings"].items() if k != "word_embeddings"}
    return {"input": embeddings, "encoder": bert_params["encoder"]}


def modality_router_probabilities(intermediates: Mapping[str, Any]) -> Array:
    """All `router_probabilities` sown by one forward pass, stacked: [adapters, B, L, experts].

    Every MoE-LoRA adapter (one per FFN linear or one per block; under `scan_layers` one entry with
    a leading depth axis) contributes its [.., B, L, experts] probabilities.
    """
    found = []

    def visit(tree):
        for key, value in tree.items():
            if key == "router_probabilities":
                found.extend(value)
            elif isinstance(value, Mapping):
                visit(value)

    visit(intermediates)
    if not found:
        raise ValueError("no router_probabilities in the intermediates (was the apply mutable=['intermediates']?)")
    return jnp.concatenate([p.reshape(-1, *p.shape[-3:]) for p in found])

