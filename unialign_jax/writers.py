"""Metric writers (CLU's `MetricWriter` shape): scalars, hyperparameters and images of a run.

Backends, chosen by name in `make_writers`:

* `jsonl`: `workdir/metrics.jsonl`, one JSON object per `write_scalars` call.
* `tensorboard`: event files in `workdir/tensorboard/` through tensorboardX (no TensorFlow; a
  `gs://` workdir needs `google-cloud-storage`, which the `gcs` extra installs with gcsfs).
* `wandb`: Weights & Biases, when installed (`pip install wandb`). The run id is kept in
  `workdir/wandb_run_id` so a resumed run continues the same W&B run. Project, entity and mode come
  from W&B's own environment variables (`WANDB_PROJECT`, default `unialign_jax`; `WANDB_ENTITY`;
  `WANDB_MODE=offline`; `WANDB_DIR` for its local files).

Only process 0 writes; `make_writers` gives every other process a `NullWriter`.

`context` (of `write_scalars` and `write_images`) carries the fields of a record that are not series
of their own, e.g. `{"stage": "stage_1_video_text", "steps_per_second": 4.2}`. In the jsonl file
they sit beside `step`, as given. For TensorBoard and W&B, string fields prefix the series names
(`stage_1_video_text/loss/total`), so every stage's curves run on that stage's own steps, and
numeric fields are written as scalars of their own.
"""

from __future__ import annotations

import abc
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorboardX
import tensorboardX.summary
from etils import epath

from unialign_jax import files

KNOWN_WRITERS = ("jsonl", "tensorboard", "wandb")


class MetricWriter(abc.ABC):
    """Where a run's metrics go. Use as a context manager, or call `close()` when done."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float], *,
                      context: Mapping[str, str | float] | None = None) -> None:
        """Writes one value per name at `step`; `context` as in the module docstring."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the run's hyperparameters (nested mappings allowed)."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, np.ndarray], *,
                     context: Mapping[str, str] | None = None) -> None:
        """Writes HxWxC uint8 images (C = 1, 3 or 4) at `step`; string `context` fields prefix the names."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Makes everything written so far visible to readers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases the backend."""

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NullWriter(MetricWriter):
    """Writes nothing: the writer of processes other than 0."""

    def write_scalars(self, step, scalars, *, context=None):
        pass

    def write_hparams(self, hparams):
        pass

    def write_images(self, step, images, *, context=None):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class MultiWriter(MetricWriter):
    """Writes everything to each of `writers`, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = tuple(writers)

    def write_scalars(self, step, scalars, *, context=None):
        for writer in self.writers:
            writer.write_scalars(step, scalars, context=context)

    def write_hparams(self, hparams):
        for writer in self.writers:
            writer.write_hparams(hparams)

    def write_images(self, step, images, *, context=None):
        for writer in self.writers:
            writer.write_images(step, images, context=context)

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()


class JsonlWriter(MetricWriter):
    """`{"step": step, **context, **scalars}` as one line of a JSON-lines file per `write_scalars`.

    Hyperparameters, images and evaluation scalars (context `split='eval'`) are not written here:
    `config.json`, `results/*.png` and `results/summary.json` hold them.
    """

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)

    def write_scalars(self, step, scalars, *, context=None):
        context = dict(context or {})
        if context.get("split") == "eval":
            return
        values = _scalars(scalars)
        _check_names(values, context)
        record = {"step": int(step), **context, **values}
        files.append_text(self.path, json.dumps(record) + "\n")

    def write_hparams(self, hparams):
        pass

    def write_images(self, step, images, *, context=None):
        pass

    def flush(self):
        pass  # every record is appended (or the file rewritten) when written

    def close(self):
        pass


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir` through tensorboardX."""

    def __init__(self, logdir: epath.PathLike):
        self.logdir = epath.Path(logdir)
        self._writer = tensorboardX.SummaryWriter(logdir=os.fspath(self.logdir), flush_secs=30)

    def write_scalars(self, step, scalars, *, context=None):
        prefix, extra = _split_context(context)
        values = _scalars(scalars)
        _check_names(values, context or {})
        for name, value in {**extra, **values}.items():
            self._writer.add_scalar(prefix + name, value, int(step))

    def write_hparams(self, hparams):
        for summary in tensorboardX.summary.hparams(_flat_hparams(hparams), {}):
            self._writer.file_writer.add_summary(summary)

    def write_images(self, step, images, *, context=None):
        prefix = _image_prefix(context)
        for name, image in _images(images).items():
            self._writer.add_image(prefix + name, image, int(step), dataformats="HWC")

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class WandbWriter(MetricWriter):
    """A Weights & Biases run that a resumed training run continues (id in `workdir/wandb_run_id`).

    Each prefix (see the module docstring) gets its own step series `<prefix>step` as its x-axis, so
    stages that count their steps from 1 do not collide in W&B's run-wide, increasing step.
    """

    def __init__(self, workdir: epath.PathLike):
        wandb = _import_wandb()
        self._wandb = wandb
        workdir = epath.Path(workdir)
        id_path = workdir / "wandb_run_id"
        run_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else None
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "unialign_jax"),
            name=workdir.name,
            id=run_id,
            resume="allow",
        )
        if run_id is None:
            files.write_atomic(id_path, self._run.id)
        self._axes: set[str] = set()

    def _log(self, prefix: str, step: int, values: Mapping[str, Any]) -> None:
        axis = prefix + "step"
        if axis not in self._axes:
            self._run.define_metric(axis)
            self._run.define_metric(prefix + "*", step_metric=axis)
            self._axes.add(axis)
        self._run.log({axis: int(step), **{prefix + name: value for name, value in values.items()}})

    def write_scalars(self, step, scalars, *, context=None):
        prefix, extra = _split_context(context)
        values = _scalars(scalars)
        _check_names(values, context or {})
        self._log(prefix, step, {**extra, **values})

    def write_hparams(self, hparams):
        self._run.config.update(dict(hparams), allow_val_change=True)

    def write_images(self, step, images, *, context=None):
        prefix = _image_prefix(context)
        pictures = {  # W&B takes grey images as (height, width)
            name: self._wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)
            for name, image in _images(images).items()
        }
        self._log(prefix, step, pictures)

    def flush(self):
        pass  # W&B streams every log call to its own service process

    def close(self):
        self._run.finish()


def check_writers(names: Sequence[str] | str) -> None:
    """Raises a ValueError for an unknown writer name or a chosen backend that is not installed.

    `names` is a sequence or a comma-separated string (`"jsonl,tensorboard"`). Call before training
    starts, on every process.
    """
    names = _names(names)
    unknown = [name for name in names if name not in KNOWN_WRITERS]
    if unknown:
        raise ValueError(
            f"Unknown metric writer(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN_WRITERS)}."
        )
    if "wandb" in names:
        _import_wandb()


def make_writers(names: Sequence[str] | str, workdir: epath.PathLike, *,
                 config: Mapping[str, Any] | None = None) -> MetricWriter:
    """The writers `names` (from `KNOWN_WRITERS`, as in `check_writers`) for `workdir`, as one writer.

    `config`, the run's resolved config as a plain dict (`ConfigDict.to_dict()`), is written as
    hyperparameters. Processes other than 0 get a `NullWriter`.
    """
    names = _names(names)
    check_writers(names)
    if not files.is_primary():
        return NullWriter()
    workdir = epath.Path(workdir)
    build = {
        "jsonl": lambda: JsonlWriter(workdir / "metrics.jsonl"),
        "tensorboard": lambda: TensorBoardWriter(workdir / "tensorboard"),
        "wandb": lambda: WandbWriter(workdir),
    }
    writer = MultiWriter([build[name]() for name in dict.fromkeys(names)])
    if config is not None:
        writer.write_hparams(config)
    return writer


def _names(names: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = names.split(",")
    return tuple(name.strip() for name in names if name.strip())


def _import_wandb():
    try:
        import wandb
    except ImportError as error:
        raise ValueError("The 'wandb' metric writer needs Weights & Biases: pip install wandb") from error
    return wandb


def _scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    values = {}
    for name, value in scalars.items():
        try:
            values[name] = float(value)
        except TypeError as error:
            raise TypeError(f"Scalar {name!r} must be a number, got {type(value).__name__}.") from error
    return values


def _check_names(values: Mapping[str, float], context: Mapping[str, Any]) -> None:
    names = ["step", *context, *values]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"Name(s) {', '.join(twice)} given twice (as the step, a context field or a scalar).")


def _split_context(context: Mapping[str, Any] | None) -> tuple[str, dict[str, float]]:
    """(`"a/b/"` from the string fields, the numeric fields as floats)."""
    prefix, values = "", {}
    for name, value in (context or {}).items():
        if isinstance(value, str):
            prefix += value + "/"
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            raise TypeError(f"Context field {name!r} must be a string or a number, got {type(value).__name__}.")
    return prefix, values


def _image_prefix(context: Mapping[str, Any] | None) -> str:
    prefix, values = _split_context(context)
    if values:
        raise ValueError(f"Image context takes string fields only; write {sorted(values)} with write_scalars.")
    return prefix


def _images(images: Mapping[str, Any]) -> dict[str, np.ndarray]:
    checked = {}
    for name, image in images.items():
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Image {name!r} must be a uint8 array of shape (height, width, 1|3|4), "
                f"got {image.dtype} {image.shape}."
            )
        checked[name] = image
    return checked


def _flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, str | bool | float]:
    """Nested mappings -> `{"a.b": value}`; TensorBoard takes strings, booleans and numbers only."""
    flat: dict[str, str | bool | float] = {}
    for name, value in hparams.items():
        key = prefix + str(name)
        if isinstance(value, Mapping):
            flat.update(_flat_hparams(value, key + "."))
        elif isinstance(value, (str, bool)):
            flat[key] = value
        elif isinstance(value, numbers.Real):
            flat[key] = float(value)
        else:
            flat[key] = json.dumps(value, default=str)
    return flat
