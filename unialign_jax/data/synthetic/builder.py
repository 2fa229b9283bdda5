"""tfds builder of the synthetic world (array_record, no TensorFlow needed).

Built on first use by `unialign_jax.data.pipeline.build_source`; by hand:

        python -c "from unialign_jax.data import synthetic; \
            synthetic.make_builder(synthetic.default_config(), '/tmp/tfds').download_and_prepare()"

Each distinct world (all parameters below plus the concept subsets) is its own tfds BuilderConfig,
named `world_<16 hex digits of a SHA-256 of the parameters>`, so worlds never collide in a data dir:
`<data_dir>/synthetic/world_<hash>/<version>/`. The parameters are written in full into the config
description (visible in `dataset_info.json`).

Data config fields (an `ml_collections.ConfigDict`, see `default_config`):
    name:            'synthetic'.
    data_dir:        tfds data dir; None or '' -> $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds.
    num_concepts:    number of concepts (classes), >= 2.
    seq_len:         events per example, T >= 1.
    modality_shapes: {modality: (T, D) or (T, H, W, C)} per-example feature shape, T = seq_len;
                                      modality names from `pipeline.MODALITIES`.
    num_train:       train examples, >= 1.
    num_test:        test examples, >= 1.
    noise:           std of the additive per-element Gaussian noise, >= 0.
    seed:            world seed: fixes the concepts, the modality maps and every example.
    concepts:        None or () (all concepts), a sequence of concept ids used by every split, or a
                                      mapping {split: sequence} (splits not named use all concepts). Labels keep their
                                      global ids, so datasets with overlapping subsets share one label space.

Features of an example: `{modality: float32[*modality_shapes[modality]]}`, `label` (ClassLabel,
the dominant concept), `step_labels: int32[T]` (the concept of each step), `id` (Text,
'<split>_<index>').
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from unialign_jax.data import pipeline
from unialign_jax.data.pipeline import MODALITIES, SPLITS, LocalBuilder, LocalDatasetInfo, check_int
from unialign_jax.data.synthetic.world import SyntheticWorld

_CONFIG_FIELDS = (
    "name", "data_dir", "num_concepts", "seq_len", "modality_shapes", "num_train", "num_test", "noise", "seed",
    "concepts",
)


def default_config() -> ml_collections.ConfigDict:
    """The default small world: 10 concepts, T = 10, video/audio/text of 64/48/32 dims per step."""
    return ml_collections.ConfigDict({
        "name": "synthetic",
        "data_dir": None,
        "num_concepts": 10,
        "seq_len": 10,
        "modality_shapes": {"video": (10, 64), "audio": (10, 48), "text": (10, 32)},
        "num_train": 2000,
        "num_test": 500,
        "noise": 1.0,
        "seed": 0,
        "concepts": None,
    })


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """A world and its sampling parameters; build with `from_data_config`, which validates them."""

    num_concepts: int = 0
    seq_len: int = 0
    modality_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    num_train: int = 0
    num_test: int = 0
    noise: float = 0.0
    seed: int = 0
    split_concepts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def from_data_config(cls, data_config: ml_collections.ConfigDict) -> SyntheticConfig:
        """Validates a data config (errors name the field) and derives the config name from its hash."""
        pipeline.check_config_fields(data_config, "synthetic", _CONFIG_FIELDS)
        field = functools.partial(pipeline.config_int, data_config)

        num_concepts = field("num_concepts", minimum=2)
        seq_len = field("seq_len", minimum=1)
        params = {
            "num_concepts": num_concepts,
            "seq_len": seq_len,
            "modality_shapes": _modality_shapes(data_config.get("modality_shapes"), seq_len),
            "num_train": field("num_train", minimum=1),
            "num_test": field("num_test", minimum=1),
            "noise": _noise(data_config.get("noise")),
            "seed": field("seed"),
            "split_concepts": pipeline.split_class_subsets(data_config.get("concepts"), num_concepts, "concepts"),
        }
        name, description = pipeline.hashed_config_name("world_", Synthetic.VERSION, params)
        return cls(name=name, description=description, **params)

    def concepts_of(self, split: str) -> tuple[int, ...]:
        return dict(self.split_concepts)[split]

    def world(self) -> SyntheticWorld:
        """The world; its modality maps take per-step shapes (the example shapes without T)."""
        return SyntheticWorld(self.num_concepts, {m: shape[1:] for m, shape in self.modality_shapes}, self.seed)


class Synthetic(LocalBuilder):
    """The synthetic world as a tfds dataset; one BuilderConfig per world (see `make_builder`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config: SyntheticConfig = self.builder_config
        features = {  # raw bytes: fast to write and read (a float list would be serialised element by element)
            m: tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
            for m, shape in config.modality_shapes
        }
        features["label"] = tfds.features.ClassLabel(num_classes=config.num_concepts)
        features["step_labels"] = tfds.features.Tensor(shape=(config.seq_len,), dtype=np.int32)
        features["id"] = tfds.features.Text()
        return LocalDatasetInfo(
            builder=self,
            description="Procedural multimodal world with known shared concepts (unialign_jax).",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # example i of a split is id '<split>_<i>'; grain shuffles
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config: SyntheticConfig = self.builder_config
        num_examples = {"train": config.num_train, "test": config.num_test}[split]
        examples = config.world().generate(
            num_examples, config.seq_len, config.concepts_of(split), config.noise,
            entropy=[config.seed, SPLITS.index(split)],
        )
        for index, example in enumerate(examples):
            example["step_labels"] = example["step_labels"].astype(np.int32)
            example["id"] = f"{split}_{index:07d}"
            yield index, example


def make_builder(data_config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> Synthetic:
    """The (not necessarily prepared) builder of the world that `data_config` describes."""
    return Synthetic(
        config=SyntheticConfig.from_data_config(data_config), data_dir=os.fspath(data_dir), file_format="array_record"
    )


# ---------------------------------------------------------------------------------------------------
# Validation helpers: each error names the data config field.


def _noise(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"data config field 'noise' must be a number >= 0, got {value!r}")
    return float(value)


def _modality_shapes(value, seq_len: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Canonical `((modality, (T, ...)), ...)` in `MODALITIES` order."""
    value = pipeline.as_mapping(value)
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"data config field 'modality_shapes' must be a non-empty mapping, got {value!r}")
    shapes = {}
    for modality, shape in value.items():
        where = f"data config field 'modality_shapes[{modality!r}]'"
        if modality not in MODALITIES:
            raise ValueError(f"data config field 'modality_shapes': unknown modality {modality!r}; known: {MODALITIES}")
        if not isinstance(shape, Sequence) or len(shape) not in (2, 4):
            raise ValueError(f"{where} must be (T, D) or (T, H, W, C), got {shape!r}")
        shape = tuple(check_int(where, d, minimum=1) for d in shape)
        if shape[0] != seq_len:
            raise ValueError(f"{where} = {shape} must start with 'seq_len' = {seq_len}")
        shapes[modality] = shape
    return tuple((m, shapes[m]) for m in MODALITIES if m in shapes)



