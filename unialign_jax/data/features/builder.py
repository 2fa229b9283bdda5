"""The `features` dataset: conversion of validated inputs into array_record, and reading it back.

`convert` writes `<data_dir>/features/<dataset>/1.0.0/` with the `Features` builder; `make_builder`
(the pipeline's entry point for `name='features'`) opens that directory read-only, so a converted
dataset is read without its input files.

Data config fields (an `ml_collections.ConfigDict`, see `default_config`):
    name:     'features'.
    data_dir: tfds data dir; None or '' -> $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds.
    dataset:  the name given to `python -m unialign_jax.data.convert --name=...`.

Features of an example: `{modality: float32[T, ...]}` (the shapes of the inputs), `label`
(ClassLabel), `step_labels: int32[T]` (the input's, else `label` at every step), `id` (Text, the
input's pair id).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from unialign_jax.data import pipeline
from unialign_jax.data.features.inputs import SplitInputs, check_splits, read_split
from unialign_jax.data.pipeline import LocalBuilder, LocalDatasetInfo

_CONFIG_FIELDS = ("name", "data_dir", "dataset")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def default_config() -> ml_collections.ConfigDict:
    """A data config reading the converted dataset 'features' (set `dataset` to your name)."""
    return ml_collections.ConfigDict({"name": "features", "data_dir": None, "dataset": "features"})


@dataclasses.dataclass(eq=False)
class FeaturesConfig(tfds.core.BuilderConfig):
    """One converted dataset: its validated input splits and label space."""

    splits: tuple[tuple[str, SplitInputs], ...] = dataclasses.field(default=(), repr=False)  # tfds logs the repr
    class_names: tuple[str, ...] = ()


class Features(LocalBuilder):
    """Writes validated pre-extracted features (`convert`); read back with `make_builder`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config: FeaturesConfig = self.builder_config
        shapes = config.splits[0][1].shapes  # check_splits made them equal in every split
        features = {
            m: tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
            for m, shape in shapes.items()
        }
        features.update(
            label=tfds.features.ClassLabel(names=config.class_names),
            step_labels=tfds.features.Tensor(shape=(next(iter(shapes.values()))[0],), dtype=np.int32),
            id=tfds.features.Text(),
        )
        return LocalDatasetInfo(
            builder=self,
            description=config.description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # stored in input order; grain shuffles
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the inputs are local files
        return {split: self._generate_examples(inputs) for split, inputs in self.builder_config.splits}

    def _generate_examples(self, inputs: SplitInputs):
        for index in range(len(inputs)):
            yield index, inputs.example(index)


def dataset_dir(data_dir: str | os.PathLike, dataset: str) -> pathlib.Path:
    """Where `convert` writes the dataset `dataset`."""
    return pathlib.Path(data_dir) / "features" / dataset / str(Features.VERSION)


def _check_dataset_name(dataset, where: str) -> str:
    if not isinstance(dataset, str) or not _DATASET_NAME.fullmatch(dataset):
        raise ValueError(f"{where} must be a name of letters, digits, '_', '.', '-' (not first), got {dataset!r}")
    return dataset


def convert(
    dataset: str,
    splits: Mapping[str, str | os.PathLike],
    *,
    data_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Validates pre-extracted features and writes them as the array_record dataset `dataset`.

    Args:
        dataset: name of the converted dataset (the data config's `dataset`).
        splits: split name -> input path in one of the layouts of the package docstring.
        data_dir: tfds data dir; None -> $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds.
        num_classes: size of the label space; default: largest label + 1 (or len(class_names)).
        class_names: names of the classes, in label order.
        overwrite: replace an existing conversion of the same name.

    Returns:
        The dataset's directory.

    Raises:
        FeatureInputError (`inputs.FeatureInputError`): the inputs have problems (all are listed, with
            file, index and id).
        FileExistsError: the dataset exists and `overwrite` is False.
    """
    dataset = _check_dataset_name(dataset, "dataset name")
    if not splits:
        raise ValueError("no splits given")
    for split in splits:
        if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
            raise ValueError(f"split name {split!r} must be lower-case letters, digits and '_', e.g. 'train'")
    data_dir = pipeline.resolve_data_dir(ml_collections.ConfigDict({"data_dir": data_dir}))
    target = dataset_dir(data_dir, dataset)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"features dataset {dataset!r} already exists at {target}; replace it with overwrite=True (--overwrite)"
        )

    inputs = {split: read_split(split, path) for split, path in splits.items()}
    largest = max(int(values.max(initial=-1)) for i in inputs.values()
                  for values in (i.labels, i.step_labels) if values is not None)
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes {num_classes} != {len(class_names)} class names")
        num_classes = len(class_names)
    num_classes = largest + 1 if num_classes is None else pipeline.check_int("num_classes", num_classes, minimum=1)
    check_splits(inputs, num_classes)

    description = json.dumps({
        "converted_from": {split: str(i.source) for split, i in inputs.items()},
        "examples": {split: len(i) for split, i in inputs.items()},
        "shapes": {m: list(shape) for m, shape in next(iter(inputs.values())).shapes.items()},
        "num_classes": num_classes,
    }, sort_keys=True)
    config = FeaturesConfig(
        name=dataset, description=description, splits=tuple(inputs.items()),
        class_names=class_names or tuple(str(label) for label in range(num_classes)),
    )
    if target.exists():
        shutil.rmtree(target)
    Features(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
    return target


def make_builder(data_config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """The converted dataset named by `data_config.dataset` (read-only; `convert` creates it)."""
    unknown = sorted(set(data_config.keys()) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"data config: unknown field(s) {unknown} for 'features'; known: {_CONFIG_FIELDS}")
    if data_config.get("name") != "features":
        raise ValueError(f"data config field 'name' must be 'features', got {data_config.get('name')!r}")
    dataset = _check_dataset_name(data_config.get("dataset"), "data config field 'dataset'")
    path = dataset_dir(data_dir, dataset)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"features dataset {dataset!r} not found at {path}: convert it first with "
            f"`python -m unialign_jax.data.convert --name={dataset} --data_dir={data_dir} --split=train=PATH "
            "--split=test=PATH` (input layouts: unialign_jax/data/features/__init__.py)"
        )
    return tfds.builder_from_directory(os.fspath(path))

