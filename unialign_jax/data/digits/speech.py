"""Spoken digits: real recordings in the FSDD layout, or speech rendered by espeak-ng.

FSDD (Free Spoken Digit Dataset, CC BY-SA 4.0): a folder of mono wav files named
`{digit}_{speaker}_{index}.wav`. Official split: indices 0-4 test, 5-49 train; or hold out whole
speakers. Other files in the folder are ignored; a wav file with another name, an unreadable file,
a stereo or empty file, or another sample rate stops the build with a message naming the file.

espeak-ng (GPL-3.0-or-later; the `libespeak-ng` and voice data shipped in the `espeakng-loader`
wheel, called through ctypes): the digit words ("zero" ... "nine") in `ESPEAK_VOICES` (English
accents x voice variants) x `ESPEAK_RATES` x `ESPEAK_PITCHES`. A voice plays the part of a
speaker: `ESPEAK_TEST_VOICES` are held out for the test split by default.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import itertools
import os
import pathlib
import re
import threading
import warnings

import numpy as np
import scipy.io.wavfile

from unialign_jax.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_TEST_INDICES = range(0, 5)  # official FSDD split: indices 0-4 test, 5-49 train
FSDD_DIR_ENV = "UNIALIGN_FSDD_DIR"
_FSDD_NAME = re.compile(r"(?P<digit>\d)_(?P<speaker>[A-Za-z0-9]+)_(?P<index>\d+)\.wav")

ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029")
ESPEAK_VARIANTS = ("m1", "m3", "m6", "f2", "f4")
ESPEAK_VOICES = tuple(f"{accent}+{variant}" for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS)
ESPEAK_TEST_VOICES = ("en+m6", "en-us+f4", "en-gb-scotland+m1", "en-029+m3")  # each accent once
ESPEAK_RATES = (140, 175, 210)  # words per minute
ESPEAK_PITCHES = (35, 50, 65)  # 0-100, espeak-ng's default is 50


class AudioInputError(UserError, ValueError):
    """A recording (or the folder holding them) is missing or malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Recording:
    """One FSDD wav file."""

    path: pathlib.Path
    digit: int
    speaker: str
    index: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclasses.dataclass(frozen=True)
class EspeakUtterance:
    """One espeak-ng rendering of a digit word."""

    digit: int
    voice: str
    rate: int
    pitch: int

    @property
    def speaker(self) -> str:
        return self.voice

    @property
    def name(self) -> str:
        return f"espeak:{self.voice}:rate={self.rate}:pitch={self.pitch}:{DIGIT_WORDS[self.digit]}"


# ---------------------------------------------------------------------------------------------------
# FSDD folders.


def list_recordings(folder: str | os.PathLike) -> tuple[Recording, ...]:
    """The FSDD recordings of a folder, sorted by file name (checks names only, reads no audio)."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise AudioInputError(f"FSDD folder {folder} does not exist or is not a directory")
    recordings = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".wav":
            continue
        match = _FSDD_NAME.fullmatch(path.name)
        if match is None:
            raise AudioInputError(f"FSDD recording {path}: name is not '{{digit}}_{{speaker}}_{{index}}.wav'")
        recordings.append(Recording(path, int(match["digit"]), match["speaker"], int(match["index"])))
    if not recordings:
        raise AudioInputError(f"FSDD folder {folder} holds no '{{digit}}_{{speaker}}_{{index}}.wav' files")
    return tuple(recordings)


def folder_fingerprint(recordings: tuple[Recording, ...]) -> str:
    """SHA-256 (16 hex digits) of the file names and sizes: changes when the folder's content does."""
    digest = hashlib.sha256()
    for recording in recordings:
        digest.update(f"{recording.path.name}:{recording.path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def is_test_recording(recording: Recording, held_out_speakers: tuple[str, ...]) -> bool:
    """Test split membership: the speaker is held out, or (no held-out speakers) the official index split."""
    if held_out_speakers:
        return recording.speaker in held_out_speakers
    return recording.index in FSDD_TEST_INDICES


def read_wav(path: pathlib.Path, description: str = "wav file") -> tuple[np.ndarray, int]:
    """(mono samples float64 in [-1, 1], sample rate) of a wav file; errors name `description` and `path`."""
    try:
        with warnings.catch_warnings():  # unknown metadata chunks are skipped; real problems raise
            warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
            rate, samples = scipy.io.wavfile.read(path)
    except (ValueError, OSError, EOFError) as error:
        raise AudioInputError(f"{description} {path}: unreadable wav file ({error})") from error
    if samples.ndim != 1:
        raise AudioInputError(f"{description} {path}: {samples.shape[1]} channels, expected mono")
    if samples.size == 0:
        raise AudioInputError(f"{description} {path}: no samples")
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        middle = (int(info.max) + int(info.min) + 1) / 2  # 128 for unsigned 8-bit, else 0
        return (samples.astype(np.float64) - middle) / (info.max - middle), int(rate)
    return samples.astype(np.float64), int(rate)


def read_recording(path: pathlib.Path, sample_rate: int) -> np.ndarray:
    """A mono FSDD wav file as float64 samples in [-1, 1]; checks the format and the sample rate."""
    samples, rate = read_wav(path, "FSDD recording")
    if rate != sample_rate:
        raise AudioInputError(
            f"FSDD recording {path}: sample rate {rate} Hz, expected {sample_rate} Hz "
            "(data config field 'fsdd_sample_rate')"
        )
    return samples


# ---------------------------------------------------------------------------------------------------
# espeak-ng through the library shipped in the espeakng-loader wheel.


def espeak_utterances(digit: int, voices: tuple[str, ...]) -> tuple[EspeakUtterance, ...]:
    """Every rendering of one digit in `voices` (x `ESPEAK_RATES` x `ESPEAK_PITCHES`), in a fixed order."""
    return tuple(
        EspeakUtterance(digit, voice, rate, pitch)
        for voice, rate, pitch in itertools.product(voices, ESPEAK_RATES, ESPEAK_PITCHES)
    )


class EspeakSynthesizer:
    """libespeak-ng in synchronous mode (one per process: the library keeps global state)."""

    _SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples come back through the callback
    _RATE, _PITCH = 1, 3  # espeak_PARAMETER ids
    _POS_CHARACTER, _CHARS_AUTO = 1, 0

    def __init__(self):
        import espeakng_loader  # pylint: disable=import-outside-toplevel

        self._library = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = self._library.espeak_Initialize(
            self._SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (data path {espeakng_loader.get_data_path()})")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # keep a reference: the library holds a raw pointer
        self._library.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    def _collect(self, samples, num_samples: int, events) -> int:
        del events
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(num_samples,)).copy())
        return 0  # continue synthesis

    def render(self, utterance: EspeakUtterance) -> np.ndarray:
        """The utterance as float64 samples in [-1, 1] at `self.sample_rate` (22,050 Hz)."""
        return self.render_text(DIGIT_WORDS[utterance.digit], utterance.voice, utterance.rate, utterance.pitch)

    def render_text(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """`text` spoken by `voice` at `rate` words per minute and `pitch` (0-100), as float64 samples in
        [-1, 1] at `self.sample_rate`."""
        with self._lock:
            self._chunks = []
            if self._library.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self._library.espeak_SetParameter(self._RATE, rate, 0)
            self._library.espeak_SetParameter(self._PITCH, pitch, 0)
            encoded = text.encode()
            self._library.espeak_Synth(encoded, len(encoded) + 1, 0, self._POS_CHARACTER, 0, self._CHARS_AUTO,
                                       None, None)
            self._library.espeak_Synchronize()
            chunks = self._chunks
        if not chunks:
            raise RuntimeError(f"espeak-ng rendered no audio for {text!r} ({voice}, rate={rate}, pitch={pitch})")
        return np.concatenate(chunks).astype(np.float64) / 32768.0


@functools.cache
def espeak_synthesizer() -> EspeakSynthesizer:
    """The process's espeak-ng synthesizer (initialised on first use)."""
    return EspeakSynthesizer()
