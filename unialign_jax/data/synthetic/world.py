"""A procedural multimodal world with known semantics (pure numpy, no tfds).

The world has `num_concepts` concepts. An example is a sequence of `seq_len` events, each event one
concept: a *dominant* concept fills one contiguous segment covering more than half of the steps
(`label`), and every other step holds a distractor concept drawn from the same concept subset
(`step_labels[t]` is the concept of step t). So both sequence classification and per-step
localisation are meaningful, and the mode of `step_labels` is always `label`.

Every modality renders the *same* event sequence through its own fixed random map:

    z[t]   = concept_embedding[step_labels[t]] + INSTANCE_JITTER * eps[t]    (shared by all modalities)
    f_m(z) = W2_m tanh(W1_m z + b1_m)                                        (fixed by seed, modality name)
    x_m[t] = style_scale_m * f_m(z[t]) + style_offset_m + noise * eps_m[t]   (style drawn per example)

`eps[t]` is shared across modalities, so paired modalities of one example agree at instance level,
not only at class level. A modality of shape `(D,)` gives `x_m: float32[T, D]`; a modality of shape
`(H, W, C)` gives `x_m: float32[T, H, W, C]`, where f_m maps to C channels that are spread over the
H x W grid by a fixed random spatial pattern of the step's concept (a Gaussian blob at a
concept-specific position), e.g. `video` of shape `(7, 7, 512)` as in the CMG reference features.

Everything that defines the world (concept embeddings, modality maps, spatial patterns) depends only
on `seed`, the concept id and the modality name and shape, never on which other concepts or
modalities a dataset contains: two datasets with the same seed but different concept subsets or
modality sets live in the same world (COMET stages rely on this).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

# Constants of the generative process. Changing any of them changes every world: bump
# `Synthetic.VERSION` in builder.py when you do.
LATENT_DIM = 32  # dimension of the concept embeddings z
HIDDEN_DIM = 64  # hidden width of each modality's random 2-layer tanh map
FIRST_LAYER_GAIN = 2.0  # std of W1 z pre-activations: enough for tanh to be clearly nonlinear
INSTANCE_JITTER = 0.3  # std of the per-step latent jitter shared by all modalities of an example
STYLE_OFFSET_STD = 0.3  # std of the per-example, per-modality additive offset
STYLE_LOG_SCALE_STD = 0.1  # std of the log of the per-example, per-modality scale
DOMINANT_MIN_FRACTION = 0.6  # the dominant segment covers at least this fraction of the steps
SPATIAL_FLOOR = 0.25  # minimum weight of a spatial pattern, so every cell carries some signal

_CONCEPT_TAG = 1
_MAP_TAG = 2
_PATTERN_TAG = 3
_EVENTS_TAG = 4
_RENDER_TAG = 5
RENDER_CHUNK = 64  # examples rendered together; part of the generative process (fixes the streams)


def _stable_id(text: str) -> int:
    """A process-independent integer for a name (Python's `hash` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def dominant_segment_min_length(seq_len: int) -> int:
    """Shortest dominant segment: `ceil(DOMINANT_MIN_FRACTION * seq_len)`, always > seq_len / 2."""
    return int(np.ceil(DOMINANT_MIN_FRACTION * seq_len))


class ModalityMap:
    """The fixed random nonlinear renderer of one modality: latent `[..., LATENT_DIM]` -> `[..., *shape]`."""

    def __init__(self, modality: str, shape: Sequence[int], seed: int):
        self.modality = modality
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) not in (1, 3):
            raise ValueError(f"modality {modality!r}: shape {self.shape} must be (D,) or (H, W, C)")
        out_dim = self.shape[-1]
        rng = np.random.default_rng([seed, _MAP_TAG, _stable_id(modality), *self.shape])
        self.w1 = rng.normal(0.0, FIRST_LAYER_GAIN / np.sqrt(LATENT_DIM), (LATENT_DIM, HIDDEN_DIM))
        self.b1 = rng.normal(0.0, 0.5, (HIDDEN_DIM,))
        self.w2 = rng.normal(0.0, 1.0 / np.sqrt(HIDDEN_DIM), (HIDDEN_DIM, out_dim))

    def features(self, latent: np.ndarray) -> np.ndarray:
        """`W2 tanh(W1 z + b1)`: `[..., LATENT_DIM]` -> `[..., shape[-1]]`."""
        return np.tanh(latent @ self.w1 + self.b1) @ self.w2


class SyntheticWorld:
    """Concept embeddings, modality maps and spatial patterns of one world, fixed by `seed`.

    Attributes:
        num_concepts: number of concepts; concept ids are `0 .. num_concepts - 1`.
        modality_shapes: modality name -> per-step feature shape, `(D,)` or `(H, W, C)`.
        seed: the world seed.
        concept_embeddings: `float64[num_concepts, LATENT_DIM]`, standard normal.
        maps: modality name -> its `ModalityMap`.
    """

    def __init__(self, num_concepts: int, modality_shapes: Mapping[str, Sequence[int]], seed: int):
        self.num_concepts = int(num_concepts)
        self.seed = int(seed)
        self.modality_shapes = {m: tuple(int(d) for d in s) for m, s in modality_shapes.items()}
        self.concept_embeddings = np.stack([
            np.random.default_rng([self.seed, _CONCEPT_TAG, c]).normal(size=LATENT_DIM)
            for c in range(self.num_concepts)
        ])
        self.maps = {m: ModalityMap(m, s, self.seed) for m, s in self.modality_shapes.items()}

    def spatial_patterns(self, height: int, width: int) -> np.ndarray:
        """`float64[num_concepts, height, width]`: per concept, `SPATIAL_FLOOR + exp(-d^2 / 2 sigma^2)`.

        The blob centre is uniform over the grid and sigma is 0.15 to 0.4 of the larger side, both fixed
        by the seed and the concept id.
        """
        rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        patterns = []
        for concept in range(self.num_concepts):
            rng = np.random.default_rng([self.seed, _PATTERN_TAG, concept, height, width])
            centre_row, centre_col = rng.uniform(0, height - 1), rng.uniform(0, width - 1)
            sigma = rng.uniform(0.15, 0.4) * max(height, width)
            squared_distance = (rows - centre_row) ** 2 + (cols - centre_col) ** 2
            patterns.append(SPATIAL_FLOOR + np.exp(-squared_distance / (2 * sigma**2)))
        return np.stack(patterns)

    def sample_events(
        self, rng: np.random.Generator, num_examples: int, seq_len: int, concepts: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draws event sequences whose concepts all lie in `concepts`.

        Dominant concepts are class-balanced (each concept of the subset appears `num_examples /
        len(concepts)` times, up to rounding) in random order. The dominant segment has a length uniform
        in `[dominant_segment_min_length(seq_len), seq_len]` and a uniform start; each remaining step is a
        uniformly drawn *other* concept of the subset (the dominant one if the subset has one concept).

        Returns:
            `(label int64[num_examples], step_labels int64[num_examples, seq_len])`.
        """
        subset = np.asarray(concepts, dtype=np.int64)
        label_positions = rng.permutation(np.resize(np.arange(len(subset)), num_examples))
        labels = subset[label_positions]
        min_length = dominant_segment_min_length(seq_len)
        lengths = rng.integers(min_length, seq_len + 1, size=num_examples)
        starts = rng.integers(0, seq_len - lengths + 1)
        steps = np.arange(seq_len)
        in_segment = (steps >= starts[:, None]) & (steps < (starts + lengths)[:, None])
        if len(subset) > 1:
            shift = rng.integers(1, len(subset), size=(num_examples, seq_len))
            distractors = subset[(label_positions[:, None] + shift) % len(subset)]
        else:
            distractors = np.broadcast_to(labels[:, None], (num_examples, seq_len))
        step_labels = np.where(in_segment, labels[:, None], distractors)
        return labels, step_labels

    def render(self, step_labels: np.ndarray, noise: float, entropy: Sequence[int]) -> dict[str, np.ndarray]:
        """Renders `step_labels: int[N, T]` into every modality of the world.

        All randomness (latent jitter, styles, noise) comes from generators seeded by `entropy` (plus the
        modality name for styles and noise), so the output is a function of the arguments, and adding
        or removing a modality leaves the others unchanged.

        Returns:
            modality -> `float32[N, T, *modality_shapes[modality]]`, in `modality_shapes` order.
        """
        entropy = [int(e) for e in entropy]
        latent = self.concept_embeddings[step_labels]
        latent = latent + INSTANCE_JITTER * np.random.default_rng(entropy).normal(size=latent.shape)
        num_examples = step_labels.shape[0]
        rendered = {}
        for modality, shape in self.modality_shapes.items():
            rng = np.random.default_rng([*entropy, _stable_id(modality)])
            # The maps run in float64; the per-element work (spatial spread, noise) in float32.
            channels = self.maps[modality].features(latent).astype(np.float32)  # [N, T, shape[-1]]
            if len(shape) == 3:
                patterns = self.spatial_patterns(shape[0], shape[1]).astype(np.float32)[step_labels]  # [N, T, H, W]
                signal = patterns[..., None] * channels[:, :, None, None, :]
            else:
                signal = channels
            broadcast_ones = (1,) * (signal.ndim - 2)
            offset = rng.normal(0.0, STYLE_OFFSET_STD, (num_examples, *broadcast_ones, shape[-1]))
            scale = np.exp(rng.normal(0.0, STYLE_LOG_SCALE_STD, (num_examples, *broadcast_ones, 1)))
            features = scale.astype(np.float32) * signal + offset.astype(np.float32)
            features += np.float32(noise) * rng.standard_normal(size=signal.shape, dtype=np.float32)
            rendered[modality] = features
        return rendered

    def generate(
        self, num_examples: int, seq_len: int, concepts: Sequence[int], noise: float, entropy: Sequence[int]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields `num_examples` examples `{modality..., 'label', 'step_labels'}` (labels int64).

        Events are drawn at once; rendering runs in chunks of `RENDER_CHUNK` examples (a reference-size
        video world never holds a whole split in memory), each chunk seeded by `(*entropy, chunk)`.
        """
        entropy = [int(e) for e in entropy]
        labels, step_labels = self.sample_events(
            np.random.default_rng([*entropy, _EVENTS_TAG]), num_examples, seq_len, concepts
        )
        for chunk, start in enumerate(range(0, num_examples, RENDER_CHUNK)):
            stop = min(start + RENDER_CHUNK, num_examples)
            rendered = self.render(step_labels[start:stop], noise, [*entropy, _RENDER_TAG, chunk])
            for i in range(stop - start):
                example = {m: features[i] for m, features in rendered.items()}
                example["label"] = labels[start + i]
                example["step_labels"] = step_labels[start + i]
                yield example
