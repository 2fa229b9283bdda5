"""Modality tokenizers: each maps one modality's raw input to tokens [B, L, D] for the shared backbone.

Every tokenizer adds a learned positional embedding to its tokens: a table `pos_embedding` [L, D]
(init N(0, D^-1/2), as ViT-Lens), or for points an MLP of the group centre; the backbone adds the
class token (`transformer.ClipBackbone`).

| modality | input                     | tokens                                                          |
|----------|---------------------------|-----------------------------------------------------------------|
| image    | [B, H, W, C]              | (H/p)(W/p) conv patches (CLIP `conv1`: p×p, stride p, no bias)  |
| depth    | [B, H, W] or [B, H, W, 1] | one-channel conv patches (ViT-Lens depth: 16×16, stride 16)     |
| audio    | [B, time, mel]            | AST patches: 16×16 stride 10 on the (mel × time) map, mel-major |
| video    | [B, T, H, W, C]           | T × per-frame patches + spatial and temporal embeddings         |
| points   | [B, N, 3 + extra]         | FPS centres + kNN groups -> mini-PointNet (PointBERT)           |
| features | [B, T, D_in]              | linear projection of each step                                  |

Sizes are static (fixed by the input shapes at init), so every tokenizer is jit-able.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def add_positional_embedding(module: nn.Module, tokens: Array, num_positions: int | None) -> Array:
    """tokens [.., L, D] + the first L rows of `module`'s param `pos_embedding` [num_positions or L, D]."""
    length, width = tokens.shape[-2:]
    num_positions = length if num_positions is None else num_positions
    if length > num_positions:
        raise ValueError(f"{length} tokens exceed the {num_positions} positional embeddings of {module.name}")
    positions = module.param("pos_embedding", nn.initializers.normal(width**-0.5), (num_positions, width))
    return tokens + positions[:length].astype(tokens.dtype)


class PatchTokenizer(nn.Module):
    """Conv patch embedding + positional embedding: [B, H, W, C] -> [B, gh·gw, D] (row-major patches).

    Params: `patch_embed/kernel` [kh, kw, C, D] (+ `bias` when `use_bias`), `pos_embedding`.
    `stride` defaults to `patch_size` (non-overlapping patches); `num_positions` defaults to gh·gw.
    """

    width: int
    patch_size: int | Sequence[int] = 16
    stride: int | Sequence[int] | None = None
    use_bias: bool = False
    num_positions: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        if images.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects [B, H, W, C], got shape {images.shape}")
        kernel = _pair(self.patch_size)
        stride = kernel if self.stride is None else _pair(self.stride)
        if images.shape[1] < kernel[0] or images.shape[2] < kernel[1]:
            raise ValueError(f"input {images.shape[1:3]} is smaller than the patch {kernel}")
        x = nn.Conv(
            self.width,
            kernel,
            strides=stride,
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="patch_embed",
        )(images)
        x = x.reshape(x.shape[0], -1, self.width)
        return add_positional_embedding(self, x, self.num_positions)


class ImageTokenizer(PatchTokenizer):
    """Image patches [B, H, W, C] -> tokens (CLIP ViT `conv1` + positional embedding of the patches)."""


class DepthTokenizer(nn.Module):
    """One-channel depth/disparity map [B, H, W] or [B, H, W, 1] -> patch tokens (params under `patches`)."""

    width: int
    patch_size: int | Sequence[int] = 16
    num_positions: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, depth: Array) -> Array:
        if depth.ndim == 3:
            depth = depth[..., None]
        if depth.ndim != 4 or depth.shape[-1] != 1:
            raise ValueError(f"DepthTokenizer expects [B, H, W] or [B, H, W, 1], got shape {depth.shape}")
        return PatchTokenizer(
            self.width, self.patch_size, num_positions=self.num_positions, dtype=self.dtype, name="patches"
        )(depth)


class AudioTokenizer(nn.Module):
    """AST-style spectrogram patches: [B, time, mel] -> [B, F·T', D] (params under `patches`).

    The spectrogram is laid out as a (mel × time) one-channel image and cut into `patch_size` patches
    every `stride` bins, tokens in frequency-major order as AST: a 128-mel × 512-frame log-mel gives
    12 × 50 = 600 tokens with the defaults (16×16 kernel, stride 10). For small inputs (e.g. 40 mels ×
    50 frames) pass a smaller `patch_size` / `stride`.
    """

    width: int
    patch_size: int | Sequence[int] = 16
    stride: int | Sequence[int] = 10
    num_positions: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, spectrogram: Array) -> Array:
        if spectrogram.ndim != 3:
            raise ValueError(f"AudioTokenizer expects [B, time, mel], got shape {spectrogram.shape}")
        mel_by_time = jnp.swapaxes(spectrogram, 1, 2)[..., None]
        return PatchTokenizer(
            self.width,
            self.patch_size,
            self.stride,
            num_positions=self.num_positions,
            dtype=self.dtype,
            name="patches",
        )(mel_by_time)


class VideoTokenizer(nn.Module):
    """Per-frame patches + temporal embedding: [B, T, H, W, C] -> [B, T·N, D] (time-major).

    Every frame goes through the same `patches` (`PatchTokenizer`, e.g. the CLIP image tokenizer's
    weights); frame t's tokens get `temporal_embedding[t]` (init zeros, so a new video tokenizer
    starts as independent frames). `num_frames` defaults to T.
    """

    width: int
    patch_size: int | Sequence[int] = 16
    num_frames: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: Array) -> Array:
        if video.ndim != 5:
            raise ValueError(f"VideoTokenizer expects [B, T, H, W, C], got shape {video.shape}")
        batch, frames = video.shape[:2]
        num_frames = frames if self.num_frames is None else self.num_frames
        if frames > num_frames:
            raise ValueError(f"{frames} frames exceed num_frames={num_frames}")
        tokens = PatchTokenizer(self.width, self.patch_size, dtype=self.dtype, name="patches")(
            video.reshape(batch * frames, *video.shape[2:])
        )
        tokens = tokens.reshape(batch, frames, -1, self.width)
        temporal = self.param("temporal_embedding", nn.initializers.zeros, (num_frames, self.width))
        tokens = tokens + temporal[:frames, None].astype(tokens.dtype)
        return tokens.reshape(batch, -1, self.width)


def farthest_point_sampling(points: Array, num_samples: int) -> Array:
    """Indices [B, S] of S points picked by iterative farthest-point sampling from xyz [B, N, 3].

    Starts at point 0 (as the PointNet++ CUDA kernel) and then repeatedly takes the point farthest from
    all points picked so far; distinct indices as long as the cloud has S distinct positions.
    """
    batch, num_points = points.shape[:2]
    if not 0 < num_samples <= num_points:
        raise ValueError(f"cannot sample {num_samples} of {num_points} points")

    def pick(i, state):
        chosen, distance, last = state
        last_xyz = jnp.take_along_axis(points, last[:, None, None], axis=1)  # [B, 1, 3]
        distance = jnp.minimum(distance, jnp.sum((points - last_xyz) ** 2, axis=-1))
        last = jnp.argmax(distance, axis=-1).astype(jnp.int32)
        return chosen.at[:, i].set(last), distance, last

    chosen = jnp.zeros((batch, num_samples), jnp.int32)
    distance = jnp.full((batch, num_points), jnp.inf, points.dtype)
    chosen, _, _ = jax.lax.fori_loop(1, num_samples, pick, (chosen, distance, chosen[:, 0]))
    return chosen


def knn_indices(points: Array, centers: Array, num_neighbors: int) -> Array:
    """Indices [B, S, k] of the k nearest points (xyz [B, N, 3]) to each centre [B, S, 3], nearest first."""
    if num_neighbors > points.shape[1]:
        raise ValueError(f"cannot take {num_neighbors} neighbours of {points.shape[1]} points")
    squared = (
        jnp.sum(centers**2, axis=-1)[..., :, None]
        - 2.0 * jnp.einsum("bsc,bnc->bsn", centers, points)
        + jnp.sum(points**2, axis=-1)[..., None, :]
    )
    _, indices = jax.lax.top_k(-squared, num_neighbors)
    return indices


def gather_points(values: Array, indices: Array) -> Array:
    """values [B, N, C] gathered at indices [B, ...] -> [B, ..., C]."""
    return jax.vmap(lambda v, i: v[i])(values, indices)


class MiniPointNet(nn.Module):
    """PointBERT group encoder: per-point MLP, max-pool, concat(global, local), MLP, max-pool.

    [.., k, C] -> [.., output_dim]. The Dense layers are PointBERT's kernel-1 Conv1d layers.
    Deviation: LayerNorm replaces PointBERT's BatchNorm, so there are no batch statistics to carry
    in the train state and a token does not depend on the other examples of its batch.
    """

    output_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, groups: Array) -> Array:
        x = nn.Dense(128, dtype=self.dtype, name="conv1")(groups)
        x = nn.relu(nn.LayerNorm(dtype=self.dtype, name="norm1")(x))
        x = nn.Dense(256, dtype=self.dtype, name="conv2")(x)
        pooled = jnp.max(x, axis=-2, keepdims=True)
        x = jnp.concatenate([jnp.broadcast_to(pooled, x.shape), x], axis=-1)
        x = nn.Dense(512, dtype=self.dtype, name="conv3")(x)
        x = nn.relu(nn.LayerNorm(dtype=self.dtype, name="norm2")(x))
        x = nn.Dense(self.output_dim, dtype=self.dtype, name="conv4")(x)
        return jnp.max(x, axis=-2)


class PointCloudTokenizer(nn.Module):
    """Point cloud [B, N, 3 + extra] -> [B, num_groups, D] (PointBERT / ViT-Lens tokenizer).

    FPS picks `num_groups` centres, each groups its `group_size` nearest points (xyz relative to the
    centre, extra channels such as colour kept as they are), a mini-PointNet encodes each group,
    `projection` maps it to D, and the learned positional embedding is PointBERT's MLP of the centre
    xyz (`center_embedding_1` 3 -> 128, GELU, `center_embedding_2` 128 -> D): FPS order carries no
    meaning, so there is no per-index table. Sampling and grouping are index operations (no gradient).
    """

    width: int
    num_groups: int = 512
    group_size: int = 32
    encoder_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, points: Array) -> Array:
        if points.ndim != 3 or points.shape[-1] < 3:
            raise ValueError(f"PointCloudTokenizer expects [B, N, 3 + extra], got shape {points.shape}")
        xyz = jax.lax.stop_gradient(points[..., :3])
        center_index = farthest_point_sampling(xyz, self.num_groups)
        centers = gather_points(xyz, center_index)  # [B, G, 3]
        groups = gather_points(points, knn_indices(xyz, centers, self.group_size))  # [B, G, k, C]
        groups = groups.at[..., :3].add(-centers[:, :, None, :])
        features = MiniPointNet(self.encoder_dim, self.dtype, name="group_encoder")(groups)
        tokens = nn.Dense(self.width, dtype=self.dtype, name="projection")(features)
        position = nn.Dense(128, dtype=self.dtype, name="center_embedding_1")(centers)
        position = nn.Dense(self.width, dtype=self.dtype, name="center_embedding_2")(jax.nn.gelu(position))
        return tokens + position


class FeatureTokenizer(nn.Module):
    """Pre-extracted feature sequence [B, T, D_in] -> Dense(D) + positional embedding [B, T, D].

    `num_positions` (default T) allows shorter sequences at apply time than at init.
    """

    width: int
    num_positions: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        if features.ndim != 3:
            raise ValueError(f"FeatureTokenizer expects [B, T, D_in], got shape {features.shape}")
        tokens = nn.Dense(self.width, dtype=self.dtype, name="projection")(features)
        return add_positional_embedding(self, tokens, self.num_positions)
