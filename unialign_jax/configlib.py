"""Config helpers shared by every method: arg-string parsing, `ConfigError`, data and stage entries.

Configs are `ml_collections.ConfigDict`s built by `configs/*.py:get_config(arg)`. Structural variants
come in the arg string (`--config=configs/cmg_avt.py:size=reference,data=synthetic`); scalar
overrides on the command line (`--config.stages[0].steps=200`).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from unialign_jax import optim
from unialign_jax.data import pipeline
from unialign_jax.data.pipeline import MODALITIES
from unialign_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,key2=value2` into a ConfigDict typed like `defaults` (big_vision style).

    Unknown keys and values that cannot be converted raise a `ConfigError` naming the key.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"Config arg {item!r} must look like key=value (known keys: {sorted(defaults)}).")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ConfigError(f"Unknown config arg {key!r}; known keys: {sorted(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"Config arg {key!r} must be a boolean, got {value!r}.")
            result[key] = value.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            kind = type(default)
            try:
                result[key] = kind(value)
            except ValueError:
                raise ConfigError(f"Config arg {key!r} must be {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}.") from None
        else:
            result[key] = value
    return result


def split_modalities(text: str) -> tuple[str, ...]:
    """'audio+text' -> ('audio', 'text'), checking every name."""
    names = tuple(name for name in text.split("+") if name)
    for name in names:
        if name not in MODALITIES:
            raise ValueError(f"Unknown modality {name!r} in {text!r}; known: {', '.join(MODALITIES)}.")
    return names


def digits_data(*, classes: tuple[int, ...] = (), seed: int = 0) -> ml_collections.ConfigDict:
    """The digits benchmark (real handwriting, speech and MiniLM captions), optionally a class subset."""
    from unialign_jax.data import digits

    config = digits.default_config()
    config.classes = tuple(classes) or None
    config.seed = seed
    return config


def check_run_fields(config: ml_collections.ConfigDict) -> None:
    """The loop fields every method reads: `ConfigError` naming the first bad one."""
    positive = {
        "config.batch_size": config.batch_size,
        "config.log_every": config.log_every,
        "config.checkpoint.every": config.checkpoint.every,
        "config.checkpoint.max_to_keep": config.checkpoint.max_to_keep,
    }
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    rate = config.optim.learning_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ConfigError(f"config.optim.learning_rate must be a positive number, got {rate!r}.")
    for field, known in (("name", optim.OPTIMIZERS), ("schedule", optim.SCHEDULES)):
        if config.optim[field] not in known:
            raise ConfigError(f"config.optim.{field}: unknown value {config.optim[field]!r} (known: {', '.join(known)}).")


@functools.cache
def digits_shapes() -> dict[str, tuple[int, ...]]:
    """The digits benchmark's per-example feature shapes at its default settings, from its builder
    (nothing is built), e.g. {'audio': (10, 40), 'text': (10, 384)}."""
    return pipeline.feature_shapes(digits_data())


def numbers_data(dataset: str, *, concepts=None, seed: int = 0) -> ml_collections.ConfigDict:
    """One dataset of the numbers benchmark ('handwritten', 'spoken', 'printed'): its default concept
    range, or `concepts` (a sequence, or {split: sequence})."""
    from unialign_jax.data import numbers

    config = numbers.default_config(dataset)
    config.concepts = concepts
    config.seed = seed
    return config


@functools.cache
def numbers_shapes() -> dict[str, tuple[int, ...]]:
    """The numbers benchmark's per-example feature shapes at its default settings (nothing is built):
    image, video (handwritten), audio (spoken), printed, and text (every dataset's captions)."""
    shapes = {}
    for dataset in ("handwritten", "spoken", "printed"):
        shapes.update(pipeline.feature_shapes(numbers_data(dataset)))
    return {m: shapes[m] for m in MODALITIES if m in shapes}


def features_data(dataset: str) -> ml_collections.ConfigDict:
    """A user's pre-extracted features, converted by `python -m unialign_jax.data.convert --name=...`."""
    from unialign_jax.data import features

    config = features.default_config()
    config.dataset = dataset
    return config


def synthetic_data(
    modalities: tuple[str, ...],
    shapes: dict,
    *,
    concepts: tuple[int, ...] = (),
    num_concepts: int = 10,
    num_train: int = 2000,
    num_test: int = 500,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The procedural world of `unialign_jax.data.synthetic` rendering `modalities`."""
    return ml_collections.ConfigDict(
        dict(
            name="synthetic",
            data_dir="",
            num_concepts=num_concepts,
            seq_len=shapes[modalities[0]][0],
            modality_shapes={m: tuple(shapes[m]) for m in modalities},
            num_train=num_train,
            num_test=num_test,
            noise=0.3,
            seed=seed,
            concepts=tuple(concepts),
        )
    )


def stage(
    name: str,
    modalities: tuple[str, ...],
    data: ml_collections.ConfigDict,
    *,
    steps: int,
    codebook_rows: int,
    mediator: str = "",
    pairs: tuple[tuple[tuple[str, ...], ml_collections.ConfigDict], ...] = (),
) -> ml_collections.ConfigDict:
    """One stage entry. `pairs`: ((modalities, data), ...) for a stage of several groups trained
    together in mixed batches; then `modalities` is their union and `data` the first group's."""
    entry = {"name": name, "modalities": tuple(modalities), "mediator": mediator, "data": data, "steps": steps,
             "codebook_rows": codebook_rows}
    if pairs:
        entry["pairs"] = [ml_collections.ConfigDict({"modalities": tuple(group), "data": group_data})
                          for group, group_data in pairs]
    return ml_collections.ConfigDict(entry)
