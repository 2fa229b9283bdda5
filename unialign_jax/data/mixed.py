"""Mixed-modality training batches: one independently shuffled stream per modality, zipped.

UniAlign trains on unpaired datasets (`papers/unialign.txt` §3.3, "Batching Strategy"): every
mini-batch mixes all modalities, each modality's rows drawn from its own dataset with its own
shuffle, so rows of different modalities are never the same instance (image<->audio stays a pair
that is never trained together even when both come from one multimodal dataset). A modality keeps
the fields it is paired with in its own dataset (e.g. the caption `text`).

Per modality m the pipeline is `MapDataset.source(train split) -> map_with_index(select fields,
join extra per-example arrays by source index) -> seed -> shuffle -> repeat -> [process shard] ->
batch(b_m)`; the streams are zipped (`grain.experimental.ZipMapDataset`) into one flat dict per step:

    {f"{m}/inputs": float32[b_m, ...], f"{m}/label": int32[b_m], f"{m}/<field>": ...}

One grain iterator, so checkpoints save and restore the position of every stream at once.
`extra` joins arrays that belong to the examples but are not stored in the dataset (cached teacher
features): row i of `extra[m][name]` is example i of m's train split in stored order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from unialign_jax.data import pipeline


def _select(index: int, example: dict, *, modality: str, fields: Sequence[str],
            extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    selected = {f"{modality}/inputs": np.asarray(example[modality], np.float32),
                f"{modality}/label": np.asarray(example["label"], np.int32)}
    for field in fields:
        selected[f"{modality}/{field}"] = np.asarray(example[field], np.float32)
    for name, values in extra.items():  # grain's source wraps indices past its length around; so do we
        selected[f"{modality}/{name}"] = values[index % len(values)]
    return selected


def _merge(parts: tuple[dict, ...]) -> dict[str, np.ndarray]:
    return {key: value for part in parts for key, value in part.items()}


def make_mixed_iterator(
    datasets: Mapping[str, ml_collections.ConfigDict],
    *,
    modalities: Sequence[str],
    batch_sizes: Mapping[str, int],
    seed: int,
    fields: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    prefetch_buffer_size: int = 4,
) -> grain.DatasetIterator:
    """Endless mixed-modality batches of the `train` splits (module docstring).

    Args:
      datasets: {modality: data config} (the same config may serve several modalities).
      modalities: the modalities, in order; modality i is shuffled with seed `seed + i`.
      batch_sizes: GLOBAL rows per step of each modality, each divisible by `process_count`.
      fields: {modality: other dataset fields kept as float32 (e.g. ('text',))}.
      extra: {modality: {name: array [N_train, ...]}} joined by stored example index.
      process_index / process_count: this process and the number of processes (default: jax's).
    """
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    fields, extra = dict(fields or {}), dict(extra or {})
    streams = []
    for offset, modality in enumerate(modalities):
        config = datasets[modality]
        available = pipeline.dataset_modalities(config)
        if missing := [m for m in (modality, *fields.get(modality, ())) if m not in available]:
            raise ValueError(f"dataset {config.get('name')!r} of {modality!r} has no {missing}; it has {available}")
        batch_size = pipeline.check_int(f"batch size of {modality!r}", batch_sizes[modality], minimum=1)
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} of {modality!r} is not divisible by {process_count} processes")
        source = pipeline.build_source(config, "train")
        joined = {name: np.asarray(values) for name, values in extra.get(modality, {}).items()}
        for name, values in joined.items():
            if len(values) != len(source):
                raise ValueError(f"extra field {name!r} of {modality!r} has {len(values)} rows, the train split "
                                 f"has {len(source)} examples")
        select = functools.partial(_select, modality=modality, fields=fields.get(modality, ()), extra=joined)
        streams.append(
            grain.MapDataset.source(source)
            .map_with_index(select)
            .seed(seed + offset)
            .shuffle()
            .repeat()
            [process_index::process_count]
            .batch(batch_size // process_count, drop_remainder=True)
        )
    length = min(len(stream) for stream in streams)  # endless streams; equal lengths for the zip
    mixed = grain.experimental.ZipMapDataset([stream[:length] for stream in streams]).map(_merge)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(mixed.to_iter_dataset(read_options))
