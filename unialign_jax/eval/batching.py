"""Fixed-size batches for jitted encoders: one compiled shape serves any number of examples."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def padded_chunks(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Consecutive chunks of `batch_size` rows of equally long arrays, the last one zero-padded to
    `batch_size` rows; yields (chunk {name: [batch_size, ...]}, number of real rows in it)."""
    lengths = {name: len(x) for name, x in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"padded_chunks needs arrays of one length, got {lengths}")
    if batch_size < 1:
        raise ValueError(f"padded_chunks: batch_size must be >= 1, got {batch_size}")
    num = next(iter(lengths.values()))
    for start in range(0, num, batch_size):
        chunk = {name: x[start : start + batch_size] for name, x in arrays.items()}
        size = len(next(iter(chunk.values())))
        yield {name: np.concatenate([x, np.zeros((batch_size - size, *x.shape[1:]), x.dtype)])
               for name, x in chunk.items()}, size
