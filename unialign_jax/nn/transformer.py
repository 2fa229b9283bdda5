"""Frozen transformer backbones with a modality-aware adapter hook in every feed-forward network.

Blocks (UniAlign Eq. 1-2 and 7):

* pre-LN (ViT / CLIP):  X' = X + MSA(LN1 X);      X'' = X' + FFN(LN2 X')
* post-LN (BERT):       X' = LN1(X + MSA(X));     X'' = LN2(X' + FFN(X'))

The FFN is `fc2(act(fc1 h))` with `act` exact GELU (BERT, OpenCLIP) or QuickGELU `x·σ(1.702x)`
(OpenAI CLIP). An *adapter* adds a trainable delta to it (the MoE-LoRA of `unialign_jax.nn.moe`):

* `adapter_placement="ffn_linears"` (LoRAMoE style, default): one adapter on each FFN linear,
  `fc1(h) + Δ1(h)` and `fc2(u) + Δ2(u)`;
* `adapter_placement="parallel"` (UniAlign Eq. 7): one d -> d adapter beside the frozen FFN,
  `FFN(h) + Δ(h)`, where `h` is the FFN input (LN2 X' in a pre-LN block).

The adapter hook is any factory `adapter(features=, num_modalities=, name=)` returning a Linen module
called as `delta = module(inputs [.., d_in], modality_id) -> [.., features]`; `modality_id` is an
int32 scalar (one modality for the whole batch) or int32[B] (one per example). `Encoder.modalities`
fixes the id of each modality name.

Parameter trees (`layer_{i}` per block, or one `layers` subtree with a leading depth axis when
`scan_layers=True`):

    layer_i/attention_norm/{scale,bias}   layer_i/attention/{query,key,value}/{kernel [D,H,Dh], bias [H,Dh]}
    layer_i/mlp_norm/{scale,bias}         layer_i/attention/out/{kernel [H,Dh,D], bias [D]}
    layer_i/mlp/{fc1,fc2}/{kernel,bias}   layer_i/mlp/{fc1_adapter,fc2_adapter | adapter}/...

There is no dropout anywhere: the backbone is frozen and used deterministically.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
AdapterFactory = Callable[..., nn.Module]
ModalityLike = int | str | Array | None

NORM_POSITIONS = ("pre", "post")
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
ADAPTER_PLACEMENTS = ("ffn_linears", "parallel")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a transformer encoder stack (what pre-trained weights determine).

    width: token dimension D. depth: number of blocks. num_heads: attention heads (D % heads == 0).
    mlp_dim: FFN hidden width. norm_position: "pre" (ViT/CLIP) or "post" (BERT).
    activation: "gelu" (exact, erf) or "quick_gelu". layer_norm_epsilon: 1e-5 (CLIP), 1e-12 (BERT).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    norm_position: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if min(self.width, self.depth, self.num_heads, self.mlp_dim) < 1:
            raise ValueError(f"all sizes must be positive: {self}")


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with the two-pass variance E[(x - mean)²] that PyTorch uses."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


def mean_pool(tokens: Array, mask: Array | None = None) -> Array:
    """Mean over the valid tokens: [B, L, D], mask [B, L] (1 = token, 0 = padding) -> [B, D]."""
    if mask is None:
        return tokens.mean(axis=-2)
    weights = mask.astype(tokens.dtype)[..., None]
    return (tokens * weights).sum(axis=-2) / jnp.maximum(weights.sum(axis=-2), 1.0)


class FeedForward(nn.Module):
    """`fc2(act(fc1 x))` plus the adapter deltas described in the module docstring."""

    mlp_dim: int
    activation: str
    adapter: AdapterFactory | None = None
    adapter_placement: str = "ffn_linears"
    num_modalities: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, modality_id: Array | None) -> Array:
        width = inputs.shape[-1]

        def delta(features: int, name: str, adapter_inputs: Array) -> Array:
            module = self.adapter(features=features, num_modalities=self.num_modalities, name=name)
            return module(adapter_inputs, modality_id).astype(self.dtype)

        hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(inputs)
        on_linears = self.adapter is not None and self.adapter_placement == "ffn_linears"
        if on_linears:
            hidden = hidden + delta(self.mlp_dim, "fc1_adapter", inputs)
        hidden = ACTIVATIONS[self.activation](hidden)
        outputs = nn.Dense(width, dtype=self.dtype, name="fc2")(hidden)
        if on_linears:
            outputs = outputs + delta(width, "fc2_adapter", hidden)
        elif self.adapter is not None:
            outputs = outputs + delta(width, "adapter", inputs)
        return outputs


class EncoderBlock(nn.Module):
    """One pre-LN or post-LN block. Call: `(x [B, L, D], mask [B, L] | None, modality_id) -> (x, None)`.

    `mask` marks valid keys (padding keys get no attention; padded query rows are still computed,
    as in BERT). The `(x, None)` return is the carry/output pair that `nn.scan` expects.
    """

    config: TransformerConfig
    adapter: AdapterFactory | None = None
    adapter_placement: str = "ffn_linears"
    num_modalities: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, modality_id: Array | None) -> tuple[Array, None]:
        config = self.config
        attention = nn.MultiHeadDotProductAttention(
            num_heads=config.num_heads, dtype=self.dtype, deterministic=True, name="attention"
        )
        mlp = FeedForward(
            config.mlp_dim,
            config.activation,
            self.adapter,
            self.adapter_placement,
            self.num_modalities,
            self.dtype,
            name="mlp",
        )
        attention_norm = layer_norm(config.layer_norm_epsilon, self.dtype, "attention_norm")
        mlp_norm = layer_norm(config.layer_norm_epsilon, self.dtype, "mlp_norm")
        attention_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
        if config.norm_position == "pre":
            x = x + attention(attention_norm(x), mask=attention_mask)
            x = x + mlp(mlp_norm(x), modality_id)
        else:
            x = attention_norm(x + attention(x, mask=attention_mask))
            x = mlp_norm(x + mlp(x, modality_id))
        return x, None


class Encoder(nn.Module):
    """A stack of `config.depth` blocks over tokens [B, L, D] (no embedding, no final norm).

    adapter / adapter_placement: the FFN adapter hook (module docstring); None = plain frozen encoder.
    modalities: modality names; the position of a name is its modality id for the adapters.
    scan_layers: run the blocks with `nn.scan` (one compiled block, params stacked under `layers`).
    remat: rematerialise each block's activations in the backward pass (`nn.remat`).
    """

    config: TransformerConfig
    adapter: AdapterFactory | None = None
    adapter_placement: str = "ffn_linears"
    modalities: Sequence[str] = ()
    scan_layers: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32

    def modality_id(self, modality: ModalityLike) -> Array | None:
        """Name or index -> int32 id (scalar, or [B] when given per example); None without adapter."""
        if self.adapter is None:
            return None
        if modality is None:
            raise ValueError(f"this encoder has adapters: pass modality= (one of {tuple(self.modalities)})")
        if isinstance(modality, str):
            if modality not in self.modalities:
                raise ValueError(
                    f"unknown modality {modality!r}; this encoder knows {tuple(self.modalities)}"
                )
            return jnp.asarray(list(self.modalities).index(modality), jnp.int32)
        if isinstance(modality, int) and not 0 <= modality < len(self.modalities):
            raise ValueError(f"modality id {modality} out of range for modalities {tuple(self.modalities)}")
        return jnp.asarray(modality, jnp.int32)

    @nn.compact
    def __call__(self, tokens: Array, *, mask: Array | None = None, modality: ModalityLike = None) -> Array:
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(
                f"adapter_placement must be one of {ADAPTER_PLACEMENTS}, got {self.adapter_placement!r}"
            )
        if self.adapter is not None and not self.modalities:
            raise ValueError("an encoder with adapters needs its `modalities` names")
        if tokens.shape[-1] != self.config.width:
            raise ValueError(f"tokens have width {tokens.shape[-1]}, the encoder expects {self.config.width}")
        modality_id = self.modality_id(modality)
        block = EncoderBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=not self.scan_layers)
        block_kwargs = dict(
            config=self.config,
            adapter=self.adapter,
            adapter_placement=self.adapter_placement,
            num_modalities=len(self.modalities),
            dtype=self.dtype,
        )
        x = tokens.astype(self.dtype)
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.config.depth,
            )
            x, _ = stack(**block_kwargs, name="layers")(x, mask, modality_id)
        else:
            for index in range(self.config.depth):
                x, _ = block(**block_kwargs, name=f"layer_{index}")(x, mask, modality_id)
        return x


class ClipBackbone(nn.Module):
    """CLIP vision trunk over pre-tokenized input from any modality tokenizer (UniAlign §3.1).

    [class token] + tokens -> pre_norm -> encoder (pre-LN blocks) -> post_norm(class token) -> projection.
    `class_embedding` already includes CLIP's positional embedding of the class position (the
    tokenizers add the positions of their own tokens). `output_dim=None` drops the projection.

    Call: `(tokens [B, L, D], mask [B, L] | None, modality) -> (embedding [B, output_dim or D],
    tokens [B, 1 + L, D])`.
    """

    encoder: Encoder
    output_dim: int | None = None

    @nn.compact
    def __call__(
        self, tokens: Array, *, mask: Array | None = None, modality: ModalityLike = None
    ) -> tuple[Array, Array]:
        config = self.encoder.config
        dtype = self.encoder.dtype
        batch = tokens.shape[0]
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(config.width**-0.5), (config.width,)
        )
        class_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, config.width))
        x = jnp.concatenate([class_tokens, tokens.astype(dtype)], axis=1)
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((batch, 1), mask.dtype), mask], axis=1)
        x = layer_norm(config.layer_norm_epsilon, dtype, "pre_norm")(x)
        x = self.encoder(x, mask=mask, modality=modality)
        pooled = layer_norm(config.layer_norm_epsilon, dtype, "post_norm")(x[:, 0])
        if self.output_dim is not None:
            pooled = nn.Dense(self.output_dim, use_bias=False, dtype=dtype, name="projection")(pooled)
        return pooled, x


class BertEmbeddings(nn.Module):
    """BERT input embeddings: word + absolute position + token type, then LayerNorm."""

    width: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array | None = None) -> Array:
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions {self.max_positions}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = functools.partial(nn.Embed, features=self.width, dtype=self.dtype)
        x = (
            embed(self.vocab_size, name="word_embeddings")(input_ids)
            + embed(self.max_positions, name="position_embeddings")(jnp.arange(length))
            + embed(self.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        )
        return layer_norm(self.layer_norm_epsilon, self.dtype, "norm")(x)


class BertTextEncoder(nn.Module):
    """BERT text encoder (e.g. all-MiniLM-L6-v2): embeddings + post-LN encoder -> token states.

    Call: `(input_ids int[B, T], mask [B, T], token_type_ids=None, modality=None) -> [B, T, D]`;
    sentence embeddings are `mean_pool(states, mask)` (then L2-normalised for sentence-transformers).
    """

    encoder: Encoder
    vocab_size: int
    max_positions: int
    type_vocab_size: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        mask: Array,
        *,
        token_type_ids: Array | None = None,
        modality: ModalityLike = None,
    ) -> Array:
        config = self.encoder.config
        x = BertEmbeddings(
            config.width,
            self.vocab_size,
            self.max_positions,
            self.type_vocab_size,
            config.layer_norm_epsilon,
            self.encoder.dtype,
            name="embeddings",
        )(input_ids, token_type_ids)
        return self.encoder(x, mask=mask, modality=modality)
