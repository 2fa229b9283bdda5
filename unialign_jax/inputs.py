"""A user's files as model inputs of one modality: float32[N, *input_shape] (`unialign_jax.load`, the
embed CLI).

Accepted, per file:

* `.npy`: one example float[*input_shape] or several float[n, *input_shape];
* `.npz`: the array named after the modality (one example or several, as `.npy`);
* `.wav` (the `audio` and `speech` modalities, inputs [T, bins]): the digits data's log-mel path
  (`data.audio_features.pooled_log_mel` with T segments and `bins` mel bins, 20-4000 Hz, so the
  file needs a sample rate of at least 8 kHz); meaningful for models trained on that path (the
  digits data, or features made with it); mono files only;
* `.png` (the `image` modality with inputs [T, W]): the digits data's image path, grayscale in
  [0, 1] resampled to T rows x W columns (`data.digits.handwriting.image_rows`); the training
  digits are bright strokes on black.

Every problem raises `InputError` naming the file.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from unialign_jax.errors import UserError

IMAGE_MODALITY = "image"  # the modality PNG files are read for
AUDIO_MODALITIES = ("audio", "speech")  # the modalities wav files are read for
SUFFIXES = (".npy", ".npz", ".wav", ".png")


class InputError(UserError, ValueError):
    """A user input (a file, a modality, a stage, a class list) that cannot be used; the message names it."""


def check_paths(paths: Sequence[str | pathlib.Path]) -> None:
    """Raises `InputError` for the first path that is not a file of a supported type (before any model loads)."""
    for path in map(pathlib.Path, paths):
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if path.suffix.lower() not in SUFFIXES:
            raise InputError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                             f"use one of {', '.join(SUFFIXES)}")


def read_inputs(paths: Sequence[str | pathlib.Path], modality: str, input_shape: Sequence[int]) -> np.ndarray:
    """float32[N, *input_shape]: the examples of every file, in order (a file may hold several)."""
    if not paths:
        raise InputError(f"no input files for modality {modality!r}")
    return np.concatenate([read_file(pathlib.Path(p), modality, tuple(input_shape)) for p in paths])


def read_file(path: pathlib.Path, modality: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """float32[n, *input_shape] of one file (module docstring)."""
    check_paths([path])
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return as_examples(_load_numpy(path), input_shape, str(path))
    if suffix == ".npz":
        with _open_npz(path) as stored:
            if modality not in stored.files:
                raise InputError(f"{path}: no array named {modality!r} (has {stored.files})")
            return as_examples(stored[modality], input_shape, str(path))
    if suffix == ".wav":
        if modality not in AUDIO_MODALITIES:
            raise InputError(f"{path}: wav files are read for the {AUDIO_MODALITIES} modalities, not {modality!r}")
        return _wav_features(path, input_shape)[None]
    if modality != IMAGE_MODALITY:  # .png
        raise InputError(f"{path}: PNG files are read for the {IMAGE_MODALITY!r} modality, not {modality!r}")
    return _png_rows(path, input_shape)[None]


def _load_numpy(path: pathlib.Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: unreadable .npy file ({error})") from error


def _open_npz(path: pathlib.Path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: unreadable .npz file ({error})") from error


def as_examples(array: np.ndarray, input_shape: tuple[int, ...], source: str) -> np.ndarray:
    """float32[n, *input_shape] of one example [*input_shape] or several; errors name `source`."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{source}: {array.dtype} array, expected real numbers")
    if tuple(array.shape) == input_shape:
        array = array[None]
    if tuple(array.shape[1:]) != input_shape or len(array) == 0:
        raise InputError(f"{source}: array of shape {array.shape}; the model expects {list(input_shape)} "
                         f"or [n, {', '.join(map(str, input_shape))}]")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{source}: the array holds NaN or infinite values")
    return array.astype(np.float32)


def _wav_features(path: pathlib.Path, input_shape: tuple[int, ...]) -> np.ndarray:
    # pylint: disable=import-outside-toplevel
    from unialign_jax.data.audio_features import MAX_FREQUENCY, pooled_log_mel
    from unialign_jax.data.digits import speech

    if len(input_shape) != 2:
        raise InputError(f"{path}: wav files become [T, mel bins] features; this modality's inputs are "
                         f"{list(input_shape)} (pass .npy features instead)")
    try:
        samples, rate = speech.read_wav(path)
    except speech.AudioInputError as error:
        raise InputError(str(error)) from error
    if rate < 2 * MAX_FREQUENCY:
        raise InputError(f"{path}: sample rate {rate} Hz; the log-mel filters reach {MAX_FREQUENCY:g} Hz, so the "
                         f"recording needs at least {2 * MAX_FREQUENCY:g} Hz")
    try:
        return pooled_log_mel(samples, rate, input_shape[0], num_mel_bins=input_shape[1])
    except ValueError as error:  # e.g. more mel bins than the FFT resolves at this sample rate
        raise InputError(f"{path}: {error}") from error


def _png_rows(path: pathlib.Path, input_shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel

    from unialign_jax.data.digits import handwriting  # pylint: disable=import-outside-toplevel

    if len(input_shape) != 2:
        raise InputError(f"{path}: PNG files become [rows, columns] grayscale inputs; this model's images are "
                         f"{list(input_shape)} (pass .npy arrays instead)")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path}: unreadable image ({error})") from error
    return handwriting.image_rows(pixels, *input_shape)
