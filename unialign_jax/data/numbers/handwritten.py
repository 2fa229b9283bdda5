"""Handwritten numbers 0-99: two scikit-learn handwritten digits side by side (8 x 16).

scikit-learn's `load_digits` is the UCI optdigits TEST set: 1,797 digits by 13 writers, no writer
ids, in form order (each writer's form: 0, 1, ..., 9, 0, 1, ...). The split is the one `digits` uses
(`digits.handwriting.split_indices`: the first 80 % of the indices train, the rest test), so writers
are disjoint except, at most, the one whose form straddles the boundary (index 1438). Within a split
the indices are cut into contiguous `forms` of about 1797 / 13 = 138 digits (10 train, 3 test), an
approximation of the writers: both digits of a number come from one form, so that a number looks
written by one hand. A number below 10 is its one digit, centred.
"""

from __future__ import annotations

import functools

import numpy as np

from unialign_jax.data.digits import handwriting

NUM_WRITERS = 13  # scikit-learn's DESCR: the 13 writers of the UCI test set
STROKE_WEIGHTS = ("light", "medium", "heavy")  # terciles of the digits' mean ink


@functools.cache
def forms(split: str) -> tuple[np.ndarray, ...]:
    """The contiguous index blocks ("forms", module docstring) of a split, each int64[~138]."""
    indices = np.concatenate([handwriting.split_indices(split, digit) for digit in range(10)])
    indices = np.sort(indices)
    count = max(1, round(len(indices) * NUM_WRITERS / handwriting.NUM_IMAGES))
    return tuple(np.array_split(indices, count))


def draw_digit_indices(split: str, number: int, rng: np.random.Generator) -> tuple[int, tuple[int, ...]]:
    """(form, image indices of the number's digits, most significant first) from one form of the split
    that holds images of every digit of `number`."""
    _, labels = handwriting.load_handwritten_digits()
    digits = [int(d) for d in str(number)]
    blocks = forms(split)
    usable = [f for f, block in enumerate(blocks) if all(np.any(labels[block] == d) for d in digits)]
    form = usable[rng.integers(len(usable))]
    block = blocks[form]
    return form, tuple(int(rng.choice(block[labels[block] == d])) for d in digits)


def number_image(indices: tuple[int, ...]) -> np.ndarray:
    """The digits `indices` (rows of `load_digits`) side by side: float32[8, 16] in [0, 1]; a single digit
    sits in the middle columns 4-11."""
    images, _ = handwriting.load_handwritten_digits()
    size = handwriting.IMAGE_SIZE
    canvas = np.zeros((size, 2 * size), np.float32)
    if len(indices) == 1:
        canvas[:, size // 2 : size // 2 + size] = images[indices[0]]
    else:
        canvas[:, :size], canvas[:, size:] = images[indices[0]], images[indices[1]]
    return canvas


@functools.cache
def _ink_terciles() -> np.ndarray:
    images, _ = handwriting.load_handwritten_digits()
    return np.quantile(images.mean(axis=(1, 2)), [1 / 3, 2 / 3])


def stroke_weight(indices: tuple[int, ...]) -> str:
    """'light', 'medium' or 'heavy': the digits' mean ink against the terciles over all 1,797 digits."""
    images, _ = handwriting.load_handwritten_digits()
    ink = float(np.mean([images[i].mean() for i in indices]))
    return STROKE_WEIGHTS[int(np.searchsorted(_ink_terciles(), ink))]
