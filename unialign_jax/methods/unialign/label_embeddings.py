"""UniAlign's text anchors: frozen text-encoder embeddings of captions and of class labels.

The anchor modality (text) is never trained. A dataset's text is a feature sequence float[T, D]
that the frozen text encoder already produced (digits: all-MiniLM-L6-v2 last-layer states of the
caption's word pieces, zero rows = padding); its anchor embedding is `pool_text`, the mean over the
non-padding rows, L2-normalised (the sentence-transformers pooling of those states).

Class-label embeddings Y^M (Eq. 10), one matrix [C_M, D] per dataset, i.e. per encoded modality,
from `config.anchors.source`:

* "minilm_prompts": the dataset's class names (its `label` ClassLabel) filled into the modality's
  template (e.g. "a handwritten {name}"), encoded exactly as the captions are (MiniLM word-piece
  states, `pool_text`), so labels and captions live in one space. Cached in an .npz keyed by the
  prompts (`anchors.cache_dir`, default ~/.cache/unialign_jax/anchors).
* "text_centroids": the normalised class means of `pool_text` over the training captions, for
  datasets whose text is not natural language (the synthetic world).
* "file": an .npz holding one array [C_M, D] per modality name (e.g. CLIP text-tower prompt
  embeddings computed elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unialign_jax.data import pipeline
from unialign_jax.logs import logger
from unialign_jax.losses.contrastive import l2_normalize
from unialign_jax.nn import weights as weights_lib

DEFAULT_CACHE = pathlib.Path("~", ".cache", "unialign_jax", "anchors")


def pool_text(text: jax.Array | np.ndarray) -> jax.Array:
    """Anchor embeddings of text feature sequences: [N, T, D] -> [N, D], mean over the rows that are
    not all zero (padding), L2-normalised. A sequence without any row gives the zero vector."""
    valid = jnp.any(text != 0, axis=-1, keepdims=True).astype(text.dtype)
    pooled = jnp.sum(text * valid, axis=-2) / jnp.maximum(jnp.sum(valid, axis=-2), 1.0)
    return l2_normalize(pooled)


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names of a dataset's `label` classes (builds nothing)."""
    return tuple(pipeline.make_builder(data_config).info.features["label"].names)


def minilm_prompt_embeddings(prompts: list[str], seq_len: int, anchors: ml_collections.ConfigDict) -> np.ndarray:
    """float32[len(prompts), D]: `pool_text` of the prompts' MiniLM word-piece states (cached)."""
    from unialign_jax.data.digits import captions  # pylint: disable=import-outside-toplevel

    key = hashlib.sha256(json.dumps([weights_lib.MINILM_REQUIREMENT, seq_len, prompts]).encode()).hexdigest()[:16]
    cache = pathlib.Path(anchors.cache_dir or DEFAULT_CACHE).expanduser() / f"minilm_prompts_{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["embeddings"]
    encoder = captions.caption_encoder(seq_len, anchors.minilm_path or None)
    embeddings = np.asarray(pool_text(encoder(prompts)), np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, embeddings=embeddings, prompts=np.asarray(prompts))
    os.replace(temporary, cache)
    logger.info("Encoded %d class prompts with all-MiniLM-L6-v2 (cached in %s).", len(prompts), cache)
    return embeddings


def _text_centroids(data_config: ml_collections.ConfigDict, anchor: str) -> np.ndarray:
    data = pipeline.load_split(data_config, "train", modalities=(anchor,))
    pooled = np.asarray(pool_text(data[anchor]))
    num_classes = len(class_names(data_config))
    present = np.unique(data["label"])
    if len(present) != num_classes:
        raise ValueError(f"text_centroids: the training split has captions for classes {present.tolist()} only, "
                         f"not all {num_classes}; use anchors.source='minilm_prompts' or 'file'.")
    sums = np.zeros((num_classes, pooled.shape[-1]), np.float32)
    np.add.at(sums, data["label"], pooled)
    return np.asarray(l2_normalize(sums))


def label_embeddings(config: ml_collections.ConfigDict, modalities: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{modality: float32[C, D] unit rows}: the class-label text embeddings of each modality's training
    dataset (`config.stages[0].data[modality]`), from `config.anchors.source` (module docstring)."""
    anchors = config.anchors
    if anchors.source == "file":
        path = pathlib.Path(anchors.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config.anchors.file: no class-embedding file at {path}")
        with np.load(path) as stored:
            missing = [m for m in modalities if m not in stored.files]
            if missing:
                raise ValueError(f"config.anchors.file {path} has no class embeddings for {missing} (has {stored.files})")
            return {m: np.asarray(l2_normalize(jnp.asarray(stored[m], jnp.float32))) for m in modalities}
    datasets = config.stages[0].data
    result = {}
    for modality in modalities:
        if anchors.source == "text_centroids":
            result[modality] = _text_centroids(datasets[modality], config.model.anchor)
        else:
            template = anchors.templates[modality]
            prompts = [template.format(name=name) for name in class_names(datasets[modality])]
            seq_len = config.model.input_shapes[config.model.anchor][0]
            result[modality] = minilm_prompt_embeddings(prompts, seq_len, anchors)
    return result
