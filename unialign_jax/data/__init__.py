"""Datasets as tfds builders (array_record, no TensorFlow) read through one grain pipeline.

Sources (`pipeline.SOURCES`): `synthetic` (a procedural world with known concepts, for tests and
quick runs). Use the pipeline functions; they build a dataset in the data dir on first use.
"""

from unialign_jax.data.pipeline import (
    MODALITIES,
    SOURCES,
    build_source,
    dataset_modalities,
    load_split,
    make_builder,
    make_train_iterator,
    register_modality,
    resolve_data_dir,
    select_fields,
)

__all__ = [
    "MODALITIES",
    "SOURCES",
    "build_source",
    "dataset_modalities",
    "load_split",
    "make_builder",
    "make_train_iterator",
    "register_modality",
    "resolve_data_dir",
    "select_fields",
]
