"""CMG/DCID model (the COMET backbone) for any set of modalities.

Follows the public CMG code (`haihuangcode/CMG`, `code/src/model/main_model_2.py`, `pretrain.py`;
reference_implementations.md §1.4), with every size taken from `CMGModelConfig`.

Per modality m (submodule names end in `_{m}`, so freezing regexes can select a modality):
* `video_pooler_{m}` (only [T, H, W, C] inputs): SE channel attention on the spatial average
  (C -> C/8 -> C, no bias, sigmoid; x' = x·a + x), then spatial attention pooling over the H·W
  positions (query ReLU(W_avg avg) ⊙ ReLU(W_pos x'_p), score tanh(w·query), weighted sum of x'_p).
* `semantic_encoder_{m}`: Dense(in -> semantic_dim) + `num_layers` post-LN transformer encoder
  layers (4 heads, FFN 1024, ReLU, dropout 0.1), no positional encoding.
* `specific_encoder_{m}`: [T, D] inputs: ReLU(Dense(D -> specific_dim)). [T, H, W, C] inputs, per
  frame: Conv3×3 VALID C -> c1, ReLU, Conv3×3 VALID c1 -> c2, ReLU, Conv1×1 c2 -> c2, residual
  stack (one layer: ReLU x + Conv1×1(ReLU(Conv3×3 SAME(ReLU x))), both without bias, the skip
  path rectified by the reference's in-place ReLU; final ReLU): a [H-4, W-4, c2] map for the
  decoder; plus the "CLUB feature": spatial average -> Dense(c2 -> c1),
  ReLU, Dense(c1 -> video_club_dim), the CLUB target y of a video modality.
* `decoder_{m}` (reconstructs batch[m] from the straight-through code vector and the specific
  features): [T, D]: Dense(-> D) of concat(Dense(q -> specific_dim), specific). Video: Dense(q -> q)
  tiled over the map and concatenated with it (q + c2 channels) -> ConvT3×3 -> c1, residual
  stack(c1), ConvT3×3 -> C, ReLU, ConvT1×1 C -> C: [T, H, W, C] again.
* `cpc_{m}`: `cpc_layers`-layer unidirectional LSTM (hidden `cpc_hidden`) over the semantic
  sequence and one linear predictor per prediction step.

Shared: `adapter` (COMET CMoE-Adapter, `unialign_jax.nn.moe`; only when `adapter_experts > 0`)
between the semantic encoders and the quantizer, so its output is what is quantized, committed and
fed to Cross-CPC; and the `quantizer` (`unialign_jax.nn.quantizer`). The CLUB estimators are a
separate module, `CLUBEstimators`, because they have their own optimizer.

Deviations from the reference, all deliberate:
* Text: the reference runs BERT token features [10, 768] through a trainable 2-layer BiLSTM
  (768 -> 2×128) OUTSIDE the encoder and uses its output both as the encoders' input and as the
  text reconstruction target, a target that the jointly trained BiLSTM can drive towards a
  constant (reference_implementations.md §5.3 trap 7). Here every modality feeds its raw features
  to its semantic and specific encoders and the decoder reconstructs the raw input: the text
  modules grow by 0.52M (Dense 768 -> 256 twice, decoder output 768) and the 1.31M BiLSTM is gone.
* The reference's `Semantic_Decoder` classification heads (141 classes, 0.31M) are built but used
  by no pre-training loss; they are not built here.
* Video pooling: the released code takes its softmax over a singleton axis (`nn.Softmax(dim=-1)`
  on [BT, 49, 1] scores), so every position weight is exactly 1: the "attention" is an unweighted
  SUM over the H·W positions and its params get no gradient. `video_pooling="sum"` (default)
  reproduces that (the score path's params exist, but it is not evaluated after init); `video_pooling="attention"` takes the softmax over the positions, the design
  the code intends (and reference_implementations.md §1.4 describes). Same params in both.
* The CLUB feature averages the whole [H-4, W-4] map; the reference's AvgPool2d(3, stride 1) does
  the same for its 7×7 inputs (3×3 map) and breaks for other sizes. Inputs need H, W >= 5.
* Float32 compute by default (`dtype`), not float64.
* Cross-CPC: predictions are computed for every time step at once; the LSTM is causal, so the
  prediction at t equals the reference's run on the truncated sequence z[:, :t+1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unialign_jax.nn.layers import (
    LSTM,
    MLP,
    Conv,
    ConvTranspose,
    Dense,
    Dtype,
    TransformerEncoderLayer,
)
from unialign_jax.nn.moe import CMoEAdapter
from unialign_jax.nn.quantizer import REFERENCE_EMA_ORDER, VectorQuantizer

Array = jax.Array

_QUANTIZER_FIELDS = (
    "codebook_capacity", "initial_active_codes", "decay", "epsilon", "own_feature_weight",
    "dead_code_steps", "active_code_steps", "restart_noise", "reset_ema_on_restart", "ema_order",
)
_VIDEO_POOLING = ("sum", "attention")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class CMGModelConfig:
    """Static description of a CMG/COMET model (hashable, so it can be a linen attribute).

    `input_shapes` and `specific_dims` may be given as dicts; they are stored as tuples of
    (modality, value) pairs (input shapes in `modalities` order, specific dims sorted by name).
    A modality's input shape is (T, D) or, for video-like inputs, (T, H, W, C). `specific_dims` is
    needed for every (T, D) modality; a (T, H, W, C) modality's specific (CLUB target) size is
    `video_club_dim`. `adapter_top_k` = 0 routes densely over all `adapter_experts`.

    Options for scale (none changes the function the model computes):
    * `dtype`: compute dtype; parameters stay float32 (the master weights) and are cast for each
      use, so "bfloat16" is bf16 compute with float32 master weights. bf16/fp16 outputs leave
      the model in float32, so the losses are computed in float32.
    * `remat`: rematerialise activations: each transformer layer keeps only its input for the
      backward pass and recomputes the rest there. The video encoder and decoder are not
      rematerialised: their peak memory is the backward pass's own im2col buffers (9x a conv's
      input), which recomputing the forward pass does not remove (measured; see bench.py).
    * `scan_layers`: the semantic encoders' transformer layers run as one `nn.scan` over stacked
      parameters (`semantic_encoder_{m}/layers/...`, leading axis = layer) instead of unrolled
      `layer_{i}` modules: one compiled layer body however deep the stack. Another parameter
      layout, so checkpoints do not carry over between the two settings.
    """

    modalities: tuple[str, ...]
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] | Mapping[str, Sequence[int]]
    semantic_dim: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    num_layers: int = 2
    dropout: float = 0.1
    specific_dims: tuple[tuple[str, int], ...] | Mapping[str, int] = (("audio", 256), ("text", 256))
    video_encoder_channels: tuple[int, int] = (1024, 2048)
    video_club_dim: int = 512
    video_pooling: str = "sum"
    cpc_hidden: int = 256
    cpc_layers: int = 2
    cpc_prediction_steps: int = 1
    club_hidden: int = 128
    adapter_experts: int = 0
    adapter_specific_layers: bool = True
    adapter_top_k: int = 0
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False
    # Quantizer (see VectorQuantizer); its code_dim is semantic_dim.
    codebook_capacity: int = 400
    initial_active_codes: int = 400
    decay: float = 0.99
    epsilon: float = 1e-5
    own_feature_weight: float = 0.5
    dead_code_steps: int = 300
    active_code_steps: int = 100
    restart_noise: float = 1 / 1024
    reset_ema_on_restart: bool = False
    ema_order: tuple[str, ...] = REFERENCE_EMA_ORDER  # MM-EMA update priority (VectorQuantizer).

    def __post_init__(self) -> None:
        modalities = tuple(self.modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"model.modalities must be non-empty and distinct, got {modalities}")
        shapes = dict(self.input_shapes)
        missing, extra = set(modalities) - set(shapes), set(shapes) - set(modalities)
        if missing or extra:
            raise ValueError(f"model.input_shapes must have exactly the modalities {modalities}; "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        specific = {m: int(d) for m, d in dict(self.specific_dims).items()}
        input_shapes = tuple((m, tuple(int(d) for d in shapes[m])) for m in modalities)
        object.__setattr__(self, "modalities", modalities)
        object.__setattr__(self, "input_shapes", input_shapes)
        object.__setattr__(self, "specific_dims", tuple(sorted(specific.items())))
        object.__setattr__(self, "video_encoder_channels", tuple(self.video_encoder_channels))
        object.__setattr__(self, "ema_order", tuple(self.ema_order))
        for modality, shape in input_shapes:
            self._check_input_shape(modality, shape, specific)
        if self.semantic_dim % self.num_heads:
            raise ValueError(f"model.semantic_dim={self.semantic_dim} is not divisible by "
                             f"model.num_heads={self.num_heads}")
        if len(self.video_encoder_channels) != 2:
            raise ValueError("model.video_encoder_channels must be two sizes (c1, c2), got "
                             f"{self.video_encoder_channels}")
        if self.video_pooling not in _VIDEO_POOLING:
            raise ValueError(f"model.video_pooling must be one of {_VIDEO_POOLING}, "
                             f"got {self.video_pooling!r}")
        if self.cpc_prediction_steps < 1 or self.cpc_layers < 1 or self.num_layers < 0:
            raise ValueError("model.cpc_prediction_steps and model.cpc_layers must be >= 1 and "
                             "model.num_layers >= 0")
        if self.adapter_experts < 0 or not 0 <= self.adapter_top_k <= self.adapter_experts:
            raise ValueError("need model.adapter_experts >= 0 and 0 <= model.adapter_top_k <= "
                             f"adapter_experts, got {self.adapter_experts}, {self.adapter_top_k}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if len(set(self.ema_order)) != len(self.ema_order):
            raise ValueError(f"quantizer.ema_order must name distinct modalities, got "
                             f"{self.ema_order}")
        if not 0 < self.initial_active_codes <= self.codebook_capacity:
            raise ValueError(f"quantizer.initial_active_codes={self.initial_active_codes} must be "
                             f"in [1, quantizer.codebook_capacity={self.codebook_capacity}]")

    @staticmethod
    def _check_input_shape(modality: str, shape: tuple[int, ...], specific: dict[str, int]) -> None:
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise ValueError(f"model.input_shapes.{modality} must be (T, D) or (T, H, W, C) with "
                             f"positive sizes, got {shape}")
        if len(shape) == 2:
            if specific.get(modality, 0) < 1:
                raise ValueError(f"model.specific_dims.{modality} (a positive size) is required "
                                 f"for the (T, D) modality {modality!r}; got {specific}")
            return
        _, height, width, channels = shape
        if height < 5 or width < 5:
            raise ValueError(f"model.input_shapes.{modality}={shape}: the video encoder's two "
                             "VALID 3x3 convolutions need H, W >= 5 (the reference uses 7x7)")
        if channels < 8:
            raise ValueError(f"model.input_shapes.{modality}={shape}: the video pooler's channel "
                             "attention reduces C by 8, so C must be >= 8")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> CMGModelConfig:
        """Builds the config from `cfg.model` (model fields) and `cfg.quantizer` (quantizer fields).

        Unknown keys in `cfg.model` are errors (a typo must not pass silently). `cfg.quantizer` may
        hold keys for other consumers; only the quantizer fields of this class are read from it.
        """
        model = cfg.model.to_dict()
        quantizer = cfg.quantizer.to_dict() if "quantizer" in cfg else {}
        model_fields = {f.name for f in dataclasses.fields(cls)} - set(_QUANTIZER_FIELDS)
        unknown = sorted(set(model) - model_fields)
        if unknown:
            raise ValueError(f"cfg.model has unknown field(s) {unknown}; known: "
                             f"{sorted(model_fields)} (quantizer settings go in cfg.quantizer)")
        semantic_dim = model.get("semantic_dim", cls.semantic_dim)
        if quantizer.get("code_dim", semantic_dim) != semantic_dim:
            raise ValueError(f"cfg.quantizer.code_dim={quantizer['code_dim']} must equal "
                             f"cfg.model.semantic_dim={semantic_dim}")
        return cls(**model, **{k: quantizer[k] for k in _QUANTIZER_FIELDS if k in quantizer})

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """Per-example input shape of `modality`: (T, D) or (T, H, W, C)."""
        return dict(self.input_shapes)[modality]

    def is_spatial(self, modality: str) -> bool:
        """True for (T, H, W, C) inputs (the video conv path)."""
        return len(self.input_shape(modality)) == 4

    def specific_dim(self, modality: str) -> int:
        """Size of the modality's specific feature (the CLUB target y)."""
        if self.is_spatial(modality):
            return self.video_club_dim
        return dict(self.specific_dims)[modality]

    @property
    def club_target_dims(self) -> tuple[int, ...]:
        """CLUB target sizes in `modalities` order."""
        return tuple(self.specific_dim(m) for m in self.modalities)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def as_float32(tree: Any) -> Any:
    """`tree` with its bfloat16/float16 leaves in float32 (model outputs, so losses run in float32)."""
    def widen(x: Array) -> Array:
        narrow = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
        return x.astype(jnp.float32) if narrow else x
    return jax.tree.map(widen, tree)


def reference_config(**overrides: Any) -> CMGModelConfig:
    """The tri-modal CMG pre-training model (reference §1.4).

    Inputs: video 10×7×7×512 (VGG19 pool5), audio 10×128 (VGGish), text 10×768 (BERT tokens, fed
    raw: see the module docstring); codebook 400×256. Reference parameter counts (PyTorch):
    encoder 77.8M, of which the video conv encoder with its CLUB feature MLP 72.4M; decoders 37.4M
    (video 36.8M; includes 0.31M unused classification heads); Cross-CPC 3.36M; text BiLSTM 1.31M;
    CLUB nets 0.66M; codebook buffers 0.2M.
    """
    settings = dict(
        modalities=("video", "audio", "text"),
        input_shapes={"video": (10, 7, 7, 512), "audio": (10, 128), "text": (10, 768)},
        specific_dims={"audio": 256, "text": 256},
    )
    return CMGModelConfig(**{**settings, **overrides})


class VideoSpatialPooler(nn.Module):
    """CMG `Video_Semantic_Encoder`: [B, T, H, W, C] -> [B, T, C] (see the module docstring)."""

    pooling: str  # "sum" (the released code) or "attention" (softmax over the H·W positions).
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, video: Array) -> Array:
        batch, time, height, width, channels = video.shape
        dense = functools.partial(Dense, dtype=self.dtype)
        average = video.mean(axis=(2, 3))  # [B, T, C]
        squeeze = nn.relu(dense(channels // 8, use_bias=False, name="se_reduce")(average))
        channel_gate = nn.sigmoid(dense(channels, use_bias=False, name="se_expand")(squeeze))
        attended = video * channel_gate[:, :, None, None, :] + video
        positions = attended.reshape(batch, time, height * width, channels)
        if self.pooling == "sum" and not self.is_initializing():
            # The reference's softmax over a trailing singleton axis makes every weight exactly 1 and
            # gives the score path exactly zero gradients: its params exist but it is not evaluated.
            return jnp.sum(positions, axis=-2)
        average_query = nn.relu(dense(channels // 2, name="average_projection")(average))
        position_query = nn.relu(dense(channels // 2, name="position_projection")(positions))
        scores = jnp.tanh(dense(1, name="score")(position_query * average_query[:, :, None]))
        # "sum": the reference's softmax over the trailing singleton axis (every weight is 1).
        weights = jax.nn.softmax(scores, axis=-1 if self.pooling == "sum" else -2)  # [B,T,HW,1]
        return jnp.sum(weights * positions, axis=-2)


class SemanticEncoder(nn.Module):
    """CMG `InternalTemporalRelationModule`: Dense(-> model_dim) + post-LN transformer layers.

    `remat` and `scan_layers`: see `CMGModelConfig`.
    """

    model_dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    dropout: float
    dtype: Dtype | None = None
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
        hidden = Dense(self.model_dim, dtype=self.dtype, name="input_projection")(inputs)

        def apply_layer(layer: nn.Module, hidden: Array) -> Array:
            return layer(hidden, deterministic=deterministic)

        if self.remat:
            apply_layer = nn.remat(apply_layer)
        make_layer = functools.partial(
            TransformerEncoderLayer, self.num_heads, self.ffn_dim, self.dropout, self.dtype)
        if self.scan_layers and self.num_layers:
            scan = nn.scan(lambda layer, carry, _: (apply_layer(layer, carry), None),
                           variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           length=self.num_layers)
            hidden, _ = scan(make_layer(name="layers"), hidden, None)
            return hidden
        for index in range(self.num_layers):
            hidden = apply_layer(make_layer(name=f"layer_{index}"), hidden)
        return hidden


class ResidualStack(nn.Module):
    """The reference's one-layer `ResidualStack` on NHWC maps, in-place ReLU included.

        y = relu(relu(x) + W1x1 relu(W3x3 relu(x)))          (both convolutions without bias)

    The reference's residual block starts with `nn.ReLU(inplace=True)`, which overwrites the
    block input x with relu(x) before the residual addition `x + block(x)`; so the skip path
    carries relu(x), not x. The two differ wherever x < 0, which happens at both call sites (the
    video encoder's 1x1 conv output and the decoder's first transposed conv are not rectified).
    """

    hidden: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        rectified = nn.relu(inputs)  # The reference's in-place ReLU: also the skip path's value.
        hidden = Conv(self.hidden, 3, "SAME", use_bias=False, dtype=self.dtype, name="conv_3x3")(
            rectified)
        residual = Conv(inputs.shape[-1], 1, use_bias=False, dtype=self.dtype, name="conv_1x1")(
            nn.relu(hidden))
        return nn.relu(rectified + residual)


class FeatureSpecificEncoder(nn.Module):
    """Specific encoder of a (T, D) modality: ReLU(Dense(D -> features))."""

    features: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> tuple[Array, Array]:
        specific = nn.relu(Dense(self.features, dtype=self.dtype, name="linear")(inputs))
        return specific, specific  # (decoder input, CLUB target)


class VideoSpecificEncoder(nn.Module):
    """CMG `Video_Encoder`: [B, T, H, W, C] -> (decoder map [B, T, H-4, W-4, c2], CLUB feature)."""

    channels: tuple[int, int]
    club_dim: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, video: Array) -> tuple[Array, Array]:
        batch, time, *frame_shape = video.shape
        first, second = self.channels
        frames = video.reshape(batch * time, *frame_shape)
        hidden = nn.relu(Conv(first, 3, dtype=self.dtype, name="conv_1")(frames))
        hidden = nn.relu(Conv(second, 3, dtype=self.dtype, name="conv_2")(hidden))
        hidden = Conv(second, 1, dtype=self.dtype, name="conv_3")(hidden)
        hidden = ResidualStack(second, self.dtype, name="residual")(hidden)
        feature_map = hidden.reshape(batch, time, *hidden.shape[1:])
        club_feature = MLP((first, self.club_dim), dtype=self.dtype, name="club_projection")(
            feature_map.mean(axis=(2, 3)))  # [B, T, club_dim]
        return feature_map, club_feature


class FeatureDecoder(nn.Module):
    """CMG audio/text decoder: Dense(-> output_dim) of concat(Dense(q -> S), specific [.., S])."""

    output_dim: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, specific: Array, quantized: Array) -> Array:
        projected = Dense(specific.shape[-1], dtype=self.dtype, name="code_projection")(quantized)
        joined = jnp.concatenate([projected, specific], axis=-1)
        return Dense(self.output_dim, dtype=self.dtype, name="reconstruction")(joined)


class VideoDecoder(nn.Module):
    """CMG `Video_Decoder`: (map [B, T, h, w, c2], q [B, T, D]) -> [B, T, h+4, w+4, C_out]."""

    hidden_channels: int
    output_channels: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, feature_map: Array, quantized: Array) -> Array:
        batch, time, height, width, _ = feature_map.shape
        projected = Dense(quantized.shape[-1], dtype=self.dtype, name="code_projection")(quantized)
        tiled = jnp.broadcast_to(projected[:, :, None, None],
                                 (batch, time, height, width, projected.shape[-1]))
        joined = jnp.concatenate([tiled, feature_map.astype(tiled.dtype)], axis=-1)
        hidden = joined.reshape(batch * time, height, width, joined.shape[-1])
        hidden = ConvTranspose(self.hidden_channels, 3, self.dtype, name="deconv_1")(hidden)
        hidden = ResidualStack(self.hidden_channels, self.dtype, name="residual")(hidden)
        hidden = ConvTranspose(self.output_channels, 3, self.dtype, name="deconv_2")(hidden)
        hidden = nn.relu(hidden)
        hidden = ConvTranspose(self.output_channels, 1, self.dtype, name="deconv_3")(hidden)
        return hidden.reshape(batch, time, *hidden.shape[1:])


class CPCHead(nn.Module):
    """Cross-CPC context network of one modality: LSTM + one linear predictor per step.

    [B, T, D] semantic sequence -> predictions [B, T, K, D]; predictions[:, t, k] predicts step
    t + 1 + k from the context at t. The LSTM is causal: the context at t sees inputs [0, t] only.
    """

    hidden: int
    num_layers: int
    prediction_steps: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, sequence: Array) -> Array:
        context = LSTM(self.hidden, self.num_layers, self.dtype, name="lstm")(sequence)
        return jnp.stack([
            Dense(sequence.shape[-1], dtype=self.dtype, name=f"predictor_{step}")(context)
            for step in range(self.prediction_steps)
        ], axis=-2)


class CMGModel(nn.Module):
    """CMG/DCID (+ optional COMET CMoE-Adapter) for `config.modalities` (see the module docstring).

    Variables: `params` and the codebook state (collection `quantizer`). Rngs: `dropout` when
    `train`; `quantizer` (dead-code restarts) when `update_codebook`, which also needs
    `mutable=["quantizer"]`.
    """

    config: CMGModelConfig

    def setup(self) -> None:
        config, dtype = self.config, self.config.compute_dtype
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("model.dtype='float64' needs jax.config.update('jax_enable_x64', True)")
        spatial = [m for m in config.modalities if config.is_spatial(m)]
        # Dict attributes name their submodules `{attribute}_{modality}`, e.g. `decoder_audio`.
        self.video_pooler = {m: VideoSpatialPooler(config.video_pooling, dtype) for m in spatial}
        self.semantic_encoder = {
            m: SemanticEncoder(config.semantic_dim, config.num_heads, config.ffn_dim,
                               config.num_layers, config.dropout, dtype, config.remat,
                               config.scan_layers)
            for m in config.modalities
        }
        self.specific_encoder = {m: self._specific_encoder(m) for m in config.modalities}
        self.decoder = {m: self._decoder(m) for m in config.modalities}
        self.cpc = {
            m: CPCHead(config.cpc_hidden, config.cpc_layers, config.cpc_prediction_steps, dtype)
            for m in config.modalities
        }
        if config.adapter_experts:
            self.adapter = CMoEAdapter(config.adapter_experts, config.semantic_dim,
                                       config.adapter_specific_layers, config.adapter_top_k, dtype)
        self.quantizer = VectorQuantizer(
            codebook_capacity=config.codebook_capacity, code_dim=config.semantic_dim,
            initial_active_codes=config.initial_active_codes, modalities=config.modalities,
            ema_order=config.ema_order, decay=config.decay, epsilon=config.epsilon,
            own_feature_weight=config.own_feature_weight,
            dead_code_steps=config.dead_code_steps, active_code_steps=config.active_code_steps,
            restart_noise=config.restart_noise, reset_ema_on_restart=config.reset_ema_on_restart)

    def _specific_encoder(self, modality: str) -> nn.Module:
        config = self.config
        if config.is_spatial(modality):
            return VideoSpecificEncoder(config.video_encoder_channels, config.video_club_dim,
                                        config.compute_dtype)
        return FeatureSpecificEncoder(config.specific_dim(modality), config.compute_dtype)

    def _decoder(self, modality: str) -> nn.Module:
        config = self.config
        output_dim = config.input_shape(modality)[-1]
        if config.is_spatial(modality):
            return VideoDecoder(config.video_encoder_channels[0], output_dim, config.compute_dtype)
        return FeatureDecoder(output_dim, config.compute_dtype)

    def __call__(
        self, batch: Mapping[str, Array], *, train: bool, update_codebook: bool
    ) -> dict[str, Any]:
        """Runs the modalities of `config.modalities` present in `batch` (other keys are ignored).

        Returns a dict of dicts keyed by modality (B batch, T time, D semantic_dim, C codebook
        capacity, K prediction steps, U experts):
        `semantic` [B, T, D] (after the adapter: what is quantized, and the Cross-CPC input),
        `quantized` [B, T, D] (straight-through), `code_vectors` [B, T, D], `codes` int32 [B, T],
        `squared_distances` [B, T, C], `specific` (CLUB target y, [B, T, S_m]), `reconstruction`
        (shape of batch[m]), `cpc_predictions` [B, T, K, D], `router_probs` [B, T, U] (only with
        the adapter); and `active_mask` bool [C].
        """
        present = self._present_modalities(batch)
        semantic, router_probs = {}, {}
        for modality in present:
            semantic[modality], probabilities = self._semantic(
                modality, batch[modality], deterministic=not train)
            if probabilities is not None:
                router_probs[modality] = probabilities
        codebook = self.quantizer(semantic, update=update_codebook)

        specific, reconstruction, cpc_predictions = {}, {}, {}
        for modality in present:
            decoder_input, specific[modality] = self.specific_encoder[modality](
                batch[modality].astype(self.config.compute_dtype))
            reconstruction[modality] = self.decoder[modality](
                decoder_input, codebook.quantized[modality])
            cpc_predictions[modality] = self.cpc[modality](semantic[modality])

        outputs = {
            "semantic": semantic,
            "quantized": codebook.quantized,
            "code_vectors": codebook.code_vectors,
            "codes": codebook.codes,
            "squared_distances": codebook.squared_distances,
            "active_mask": codebook.active_mask,
            "specific": specific,
            "reconstruction": reconstruction,
            "cpc_predictions": cpc_predictions,
        }
        if self.config.adapter_experts:
            outputs["router_probs"] = router_probs
        return as_float32(outputs)

    def predict_future(self, sequence: Array, modality: str) -> Array:
        """Cross-CPC predictions [B, T, K, D] of `modality`'s CPC head for an external sequence.

        COMET Pseudo-Modality Replay feeds the pseudo-modality (teacher code vectors standing in for
        the previous stage's partner modality) through that modality's CPC head.
        """
        return as_float32(self.cpc[modality](sequence))

    def encode(self, batch: Mapping[str, Array]) -> dict[str, tuple[Array, Array]]:
        """Evaluation encoding: {modality: (codes int32 [B, T], code_vectors [B, T, D])}.

        Deterministic (no dropout), runs only the semantic path, never changes the codebook.
        """
        return self.encode_with_routing(batch)[0]

    def encode_with_routing(
        self, batch: Mapping[str, Array]
    ) -> tuple[dict[str, tuple[Array, Array]], dict[str, Array]]:
        """`encode`'s output and, with the adapter, the router probabilities {modality: [B, T, U]}."""
        present = self._present_modalities(batch)
        semantic, router_probs = {}, {}
        for modality in present:
            semantic[modality], probabilities = self._semantic(modality, batch[modality], deterministic=True)
            if probabilities is not None:
                router_probs[modality] = probabilities
        codebook = self.quantizer(semantic, update=False)
        encoded = {m: (codebook.codes[m], codebook.code_vectors[m]) for m in present}
        return encoded, as_float32(router_probs)

    def semantic_features(self, inputs: Array, modality: str) -> Array:
        """Deterministic semantic features [B, T, D] of one modality (after the adapter): what is
        quantized. Reads only that modality's semantic path (video pooler, semantic encoder, adapter
        router, common and `specific_{modality}` layers), so a params tree of just those works."""
        return as_float32(self._semantic(modality, inputs, deterministic=True)[0])

    def _semantic(
        self, modality: str, inputs: Array, *, deterministic: bool
    ) -> tuple[Array, Array | None]:
        """Semantic features [B, T, D] of one modality and the adapter's router probabilities."""
        inputs = inputs.astype(self.config.compute_dtype)
        if self.config.is_spatial(modality):
            inputs = self.video_pooler[modality](inputs)
        features = self.semantic_encoder[modality](inputs, deterministic=deterministic)
        if not self.config.adapter_experts:
            return features, None
        return self.adapter(features, modality)

    def _present_modalities(self, batch: Mapping[str, Array]) -> tuple[str, ...]:
        """Configured modalities found in `batch`, in config order, after checking their shapes."""
        present = tuple(m for m in self.config.modalities if m in batch)
        if not present:
            raise ValueError(f"batch has none of the model's modalities {self.config.modalities}; "
                             f"keys: {sorted(batch)}")
        for modality in present:
            expected, shape = self.config.input_shape(modality), tuple(batch[modality].shape)
            if shape[1:] != expected:
                raise ValueError(f"batch[{modality!r}] has shape {shape}; the model expects "
                                 f"[B, {', '.join(map(str, expected))}] (model.input_shapes)")
        return present


class CLUBEstimators(nn.Module):
    """CLUB variational nets q(y|x) = N(mu(x), exp(logvar(x))) per modality (`CLUBSample_group`).

    x = the quantized code vectors [B, T, D], y = the modality's specific feature; applied per
    time step. Mu-net `mu_{m}` and logvar-net `logvar_{m}`: Dense D -> hidden, ReLU, hidden ->
    hidden, ReLU, hidden -> hidden, ReLU, hidden -> y_dim (the logvar-net ends with tanh). Their
    params are a tree of their own with their own optimizer. `y_dims` is aligned with `modalities`.
    """

    modalities: tuple[str, ...]
    y_dims: tuple[int, ...]
    hidden: int = 128
    dtype: Dtype | None = None

    @classmethod
    def for_model(cls, config: CMGModelConfig) -> CLUBEstimators:
        """The estimators matching a `CMGModel` built from `config`."""
        return cls(config.modalities, config.club_target_dims, config.club_hidden,
                   config.compute_dtype)

    @nn.compact
    def __call__(self, x: Mapping[str, Array]) -> dict[str, tuple[Array, Array]]:
        """{modality: x [.., D]} (a subset of `modalities`) -> {modality: (mu, logvar) [.., y]}."""
        if len(self.y_dims) != len(self.modalities):
            raise ValueError(f"y_dims {self.y_dims} must align with modalities {self.modalities}")
        unknown = sorted(set(x) - set(self.modalities))
        if unknown:
            raise ValueError(f"CLUBEstimators got modalities {unknown}; built for "
                             f"{self.modalities}")
        outputs = {}
        for modality, y_dim in zip(self.modalities, self.y_dims):
            if modality in x:
                widths = (self.hidden, self.hidden, self.hidden, y_dim)
                mu = MLP(widths, dtype=self.dtype, name=f"mu_{modality}")(x[modality])
                logvar = MLP(widths, dtype=self.dtype, name=f"logvar_{modality}")(x[modality])
                outputs[modality] = (mu, jnp.tanh(logvar))
        return as_float32(outputs)
