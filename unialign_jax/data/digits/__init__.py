"""The `digits` data source: the ten digits 0-9 as image, video, audio and text, from real sources.

`handwriting.py` (scikit-learn digits -> row sequences and clips), `speech.py` (FSDD folders and
espeak-ng), `captions.py` (templates and MiniLM token embeddings) and `builder.py` (the tfds builder,
whose docstring lists the data config fields and layouts). Read it through `unialign_jax.data.pipeline`.
Sources and licences: README.md beside this file.
"""

from unialign_jax.data.digits.builder import Digits, DigitsConfig, default_config, make_builder

__all__ = ["Digits", "DigitsConfig", "default_config", "make_builder"]
