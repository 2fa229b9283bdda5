"""Source-agnostic input pipeline: data config -> tfds builder (array_record) -> grain.

Every trainer and evaluator reads data through this module. A data config is an
`ml_collections.ConfigDict` whose `name` picks a source in `SOURCES`; the other fields belong to that
source (see its builder module). Fields every source understands:

    name:      the source: 'synthetic' (`unialign_jax.data.synthetic`, fields in its builder.py).
    data_dir:  tfds data dir; None or '' -> $UNIALIGN_DATA_DIR, else ~/.cache/unialign_jax/tfds.
               A dataset is built there on first use and read from the cache afterwards. With
               several processes on a shared file system, build it once before the launch (e.g.
               `build_source(config, 'train')` in one process): concurrent first builds race.

Example of the synthetic source (`synthetic.default_config()` gives this):

    name='synthetic', data_dir=None, num_concepts=10, seq_len=10,
    modality_shapes={'video': (10, 64), 'audio': (10, 48), 'text': (10, 32)},  # or (10, 7, 7, 512)
    num_train=2000, num_test=500, noise=1.0, seed=0,
    concepts=None  # all; or (0, 1, 2); or {'train': (0, 1), 'test': (2, 3)}

A source is a module with `make_builder(data_config, data_dir) -> tfds.core.DatasetBuilder` whose
builder writes array_record files with features `{modality: float32[T, ...], 'label': ClassLabel,
'step_labels': int[T], 'id': Text}` (modality names from `MODALITIES`). Register it in `SOURCES`.
Builders subclass `LocalBuilder` and return a `LocalDatasetInfo` from `_info()` (two tfds quirks).

Batches (training) and loaded splits (evaluation) hold only the requested modalities:
`{modality: float32[B, T, ...], 'label': int32[B], 'step_labels': int32[B, T]}`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

MODALITIES = ["video", "audio", "text", "image", "speech", "depth", "points", "printed"]
"""Every modality name the project knows, in canonical order; `register_modality` appends yours."""


def register_modality(name: str) -> None:
    """Makes `name` a known modality (appended to `MODALITIES`, so configs, the data sources and the
    synthetic world accept it); registering a known name again does nothing. Guide: docs/adding_a_modality.md."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"modality name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    if name not in MODALITIES:
        MODALITIES.append(name)

# Source name -> module defining `make_builder(data_config, data_dir)`; imported on first use.
SOURCES: dict[str, str] = {
    "synthetic": "unialign_jax.data.synthetic",
    "digits": "unialign_jax.data.digits",
    "numbers": "unialign_jax.data.numbers",
    "features": "unialign_jax.data.features",
}


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the project's tfds builders: defined inside a package, offline, without TensorFlow."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The subclass's file. (tfds 4.9.10's own lookup imports the `importlib_resources` backport,
        which is not installed, for any builder defined inside a package.)"""
        return epath.Path(inspect.getfile(cls))


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset that only exists locally."""

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch. (tfds' version, run for every builder whose data is not built yet, leaves
        an empty temporary directory behind even though GCS access is disabled.)"""


DEFAULT_DATA_DIR = os.path.join("~", ".cache", "unialign_jax", "tfds")
DATA_DIR_ENV = "UNIALIGN_DATA_DIR"


def resolve_data_dir(data_config: ml_collections.ConfigDict) -> str:
    """`data_config.data_dir`, else $UNIALIGN_DATA_DIR, else ~/.cache/unialign_jax/tfds (expanded).

    A local (or mounted) directory: ArrayRecord files are read with local file I/O, so a bucket is
    read through a mount (e.g. gcsfuse), not a `gs://` URI.
    """
    data_dir = os.fspath(data_config.get("data_dir") or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    if "://" in data_dir:
        raise ValueError(
            f"data_dir {data_dir!r} is a URI; datasets are read from a local or mounted directory "
            "(mount the bucket, e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, and use /mnt/BUCKET/...). "
            "Workdirs, unlike data dirs, may be gs:// paths."
        )
    return os.path.abspath(os.path.expanduser(data_dir))


def make_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder of the source named by `data_config.name` (validates the config, builds nothing)."""
    name = data_config.get("name")
    if name not in SOURCES:
        raise ValueError(f"data config field 'name': unknown source {name!r}; known: {tuple(SOURCES)}")
    source_module = importlib.import_module(SOURCES[name])
    return source_module.make_builder(data_config, resolve_data_dir(data_config))


def feature_shapes(data_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """{modality: per-example feature shape} of a dataset, e.g. {'audio': (10, 40)} (builds nothing)."""
    features = make_builder(data_config).info.features
    return {m: tuple(features[m].shape) for m in MODALITIES if m in features}


def _prepared_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    builder = make_builder(data_config)
    builder.download_and_prepare()  # no-op when the dataset is already in the data dir
    return builder


def build_source(data_config: ml_collections.ConfigDict, split: str):
    """Random-access source of one split (`len`, `[i]`, `__getitems__`), building the dataset if needed.

    Examples are dicts of numpy arrays with every feature of the dataset (`id` as bytes).
    """
    builder = _prepared_builder(data_config)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in dataset {builder.name!r}; splits: {tuple(builder.info.splits)}")
    return builder.as_data_source(split=split)


def dataset_modalities(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The modalities the dataset provides, in `MODALITIES` order (builds nothing)."""
    features = make_builder(data_config).info.features
    return tuple(m for m in MODALITIES if m in features)


def check_int(name: str, value, minimum: int | None = None, below: int | None = None) -> int:
    """`int(value)` if it is an integer (not a bool) in `[minimum, below)`, else a ValueError naming `name`.

    For sources validating their data config fields, too.
    """
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or (minimum is not None and value < minimum) or (below is not None and value >= below):
        if minimum is not None and below is not None:
            bounds = f" in [{minimum}, {below})"
        elif minimum is not None or below is not None:
            bounds = f" >= {minimum}" if minimum is not None else f" < {below}"
        else:
            bounds = ""
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    return int(value)


SPLITS = ("train", "test")


def as_mapping(value):
    """ConfigDicts (not `Mapping`s) as plain dicts; anything else unchanged."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def class_subset(value, num_classes: int, field: str) -> tuple[int, ...]:
    """A sorted tuple of distinct class ids in [0, num_classes) from a non-empty sequence."""
    where = f"data config field {field!r}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where} must be a non-empty sequence of class ids, got {value!r}")
    ids = tuple(check_int(f"{where} (a class id)", item, 0, num_classes) for item in value)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where} repeats a class id: {ids}")
    return tuple(sorted(ids))


def split_class_subsets(value, num_classes: int, field: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Canonical `(('train', ids), ('test', ids))` from None/() (every class), a sequence (both
    splits) or `{split: sequence}` (missing splits: every class)."""
    everything = tuple(range(num_classes))
    value = as_mapping(value)
    if value is None or (isinstance(value, Sequence) and not isinstance(value, str) and not value):
        return tuple((split, everything) for split in SPLITS)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ValueError(f"data config field {field!r}: unknown split(s) {unknown}; splits: {SPLITS}")
        return tuple((split, class_subset(value[split], num_classes, f"{field}.{split}") if split in value
                      else everything) for split in SPLITS)
    subset = class_subset(value, num_classes, field)
    return tuple((split, subset) for split in SPLITS)


def check_config_fields(data_config: ml_collections.ConfigDict, dataset: str, fields: Sequence[str]) -> None:
    """ValueError unless every field of a source's data config is in `fields` and 'name' is `dataset`."""
    unknown = sorted(set(data_config.keys()) - set(fields))
    if unknown:
        raise ValueError(f"data config: unknown field(s) {unknown} for {dataset!r}; known: {tuple(fields)}")
    if data_config.get("name") != dataset:
        raise ValueError(f"data config field 'name' must be {dataset!r}, got {data_config.get('name')!r}")


def config_int(data_config: ml_collections.ConfigDict, name: str, minimum: int | None = None) -> int:
    """`check_int` of data config field `name`."""
    return check_int(f"data config field {name!r}", data_config.get(name), minimum=minimum)


def hashed_config_name(prefix: str, version, params: Mapping) -> tuple[str, str]:
    """(`prefix` + 16 hex digits of the hash of version and params, the params as sorted JSON)."""
    description = json.dumps(params, sort_keys=True)
    digest = hashlib.sha256(f"{version}:{description}".encode()).hexdigest()[:16]
    return f"{prefix}{digest}", description


def _check_modalities(data_config: ml_collections.ConfigDict, modalities: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities:
        raise ValueError(f"modalities must be a non-empty sequence of modality names, got {modalities!r}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities repeats a modality: {tuple(modalities)}")
    available = dataset_modalities(data_config)
    missing = [m for m in modalities if m not in available]
    if missing:
        raise ValueError(
            f"modalities {missing} not provided by dataset {data_config.get('name')!r}, which has {available}"
        )
    return tuple(modalities)


def select_fields(example: dict, modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """Keeps `modalities` (as float32), `label` and `step_labels` (as int32) of one example or batch."""
    selected = {m: np.asarray(example[m], dtype=np.float32) for m in modalities}
    selected["label"] = np.asarray(example["label"], dtype=np.int32)
    selected["step_labels"] = np.asarray(example["step_labels"], dtype=np.int32)
    return selected


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    modalities: Sequence[str],
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    prefetch_buffer_size: int = 4,
) -> grain.DatasetIterator:
    """Endless, shuffled, per-process training batches of the `train` split.

    Pipeline: `MapDataset.source -> seed -> shuffle -> repeat -> [process_index::process_count] ->
    map(select_fields) -> batch(batch_size // process_count, drop_remainder) -> to_iter_dataset`.
    The shuffle is global (same seed on every process, reshuffled each epoch) and the shard is taken
    after it, so processes see disjoint examples that together cover each epoch.

    Args:
        data_config: the data config (see the module docstring).
        modalities: modalities to keep; each must be provided by the dataset.
        batch_size: GLOBAL batch size, divisible by `process_count`.
        seed: shuffle seed.
        process_index: this process; defaults to `jax.process_index()`.
        process_count: number of processes; defaults to `jax.process_count()`.
        num_threads: grain threads reading batches ahead.
        prefetch_buffer_size: batches read ahead.

    Returns:
        A grain `DatasetIterator` of `{modality: float32[b, T, ...], 'label': int32[b],
        'step_labels': int32[b, T]}` with `b = batch_size // process_count`. It has
        `get_state()` / `set_state()`; save it with Orbax through `grain.checkpoint.CheckpointSave`.
    """
    process_count = check_int(
        "process_count", jax.process_count() if process_count is None else process_count, minimum=1)
    process_index = check_int(
        "process_index", jax.process_index() if process_index is None else process_index, 0, process_count)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    seed = check_int("seed", seed)
    modalities = _check_modalities(data_config, modalities)
    dataset = (
        grain.MapDataset.source(build_source(data_config, "train"))
        .seed(seed)
        .shuffle()
        .repeat()
        [process_index::process_count]
        .map(functools.partial(select_fields, modalities=modalities))
        .batch(batch_size // process_count, drop_remainder=True)
    )
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(read_options))


def load_split(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    modalities: Sequence[str],
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """The first `max_examples` (default: all) examples of a split, in stored order, in memory.

    Returns:
        `{modality: float32[N, T, ...], 'label': int32[N], 'step_labels': int32[N, T], 'id': str[N]}`.
    """
    modalities = _check_modalities(data_config, modalities)
    if max_examples is not None:
        max_examples = check_int("max_examples", max_examples, minimum=1)
    source = build_source(data_config, split)
    num_examples = len(source) if max_examples is None else min(max_examples, len(source))
    examples = source.__getitems__(range(num_examples))
    keys = (*modalities, "label", "step_labels")
    loaded = select_fields({key: np.stack([example[key] for example in examples]) for key in keys}, modalities)
    loaded["id"] = np.asarray([example["id"].decode("utf-8") for example in examples])
    return loaded
