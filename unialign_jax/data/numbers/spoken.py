"""Spoken numbers 0-99: espeak-ng renders of the number words, and FSDD recordings for 0-9.

espeak-ng (GPL-3.0-or-later, the `espeakng-loader` wheel; `digits.speech.EspeakSynthesizer`): the
words of `words.number_word` ("forty-seven") in the 16 `VOICES` (4 English accents x the variants
m1, m3, m6, f4 of `digits.speech.ESPEAK_VOICES`), each rendering at its own rate (`RATE_RANGE` words
per minute) and pitch (`PITCH_RANGE`), drawn per instance. A voice plays the part of a speaker: the
test split uses only `digits.speech.ESPEAK_TEST_VOICES` (4 voices, each accent once), the train
split the other 12.

Renderings are made in a separate process (`render`, `espeak_worker`), one clean forked copy per
number, because libespeak-ng's output depends on what the process did before.

FSDD (CC BY-SA 4.0), when a folder is given: the numbers 0-9 are recordings instead (official split:
indices 0-4 test, 5-49 train, as `digits`), read by `digits.speech`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from unialign_jax.data.digits import speech
from unialign_jax.data.numbers.words import number_word

RATE_RANGE = (120, 230)  # words per minute, both ends included
PITCH_RANGE = (20, 80)  # espeak-ng's 0-100 scale, both ends included
ACCENTS = {"en": "British", "en-us": "American", "en-gb-scotland": "Scottish", "en-029": "Caribbean"}
VARIANTS = {"m": "male", "f": "female"}


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One espeak-ng rendering of a number word."""

    number: int
    voice: str
    rate: int
    pitch: int

    @property
    def speaker(self) -> str:
        return self.voice

    @property
    def name(self) -> str:
        return f"espeak:{self.voice}:rate={self.rate}:pitch={self.pitch}:{number_word(self.number)}"

    def describe(self) -> str:
        """'a slow, high-pitched Scottish female voice' (rate and pitch words only away from the middle)."""
        accent, variant = self.voice.split("+")
        rate = "slow" if self.rate < 150 else "fast" if self.rate > 200 else ""
        pitch = "low-pitched" if self.pitch < 40 else "high-pitched" if self.pitch > 60 else ""
        adjectives = ", ".join(word for word in (rate, pitch) if word)
        return " ".join(word for word in ("a", adjectives, ACCENTS[accent], VARIANTS[variant[0]], "voice") if word)


# The '+f2' variant renders differently in every process (its samples are not reproducible), so it is left out.
VOICES = tuple(voice for voice in speech.ESPEAK_VOICES if not voice.endswith("+f2"))


def split_voices(split: str) -> tuple[str, ...]:
    """The espeak-ng voices of a split (module docstring)."""
    return tuple(v for v in VOICES if (v in speech.ESPEAK_TEST_VOICES) == (split == "test"))


def draw_utterance(split: str, number: int, rng: np.random.Generator) -> Utterance:
    voices = split_voices(split)
    return Utterance(number, voices[rng.integers(len(voices))], int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
                     int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))


def split_recordings(recordings: tuple[speech.Recording, ...], split: str, digit: int) -> tuple[speech.Recording, ...]:
    """The FSDD recordings of `digit` in `split` (official index split)."""
    return tuple(r for r in recordings if r.digit == digit and speech.is_test_recording(r, ()) == (split == "test"))


def render(groups: Sequence[Sequence[Utterance]]) -> tuple[dict[Utterance, np.ndarray], int]:
    """({utterance: float64 samples in [-1, 1]}, sample rate) of groups of utterances, each group rendered in
    order in its own clean process (`espeak_worker`): the samples of a group depend on that group only."""
    request = [[[number_word(u.number), u.voice, u.rate, u.pitch] for u in group] for group in groups]
    worker = pathlib.Path(__file__).with_name("espeak_worker.py")
    done = subprocess.run([sys.executable, str(worker)], input=json.dumps(request).encode(), capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng worker {worker} failed:\n{done.stderr.decode(errors='replace')}")
    with np.load(io.BytesIO(done.stdout)) as stored:
        samples = {u: stored[f"g{g}_{i}"] for g, group in enumerate(groups) for i, u in enumerate(group)}
        return samples, int(stored["sample_rate"])
