"""The `numbers` benchmark: the integers 0-99 as three unpaired datasets with their own label words.

`handwritten` (two scikit-learn digits side by side, and clips of them), `spoken` (espeak-ng number
words; FSDD for 0-9), `printed` (numerals in matplotlib's fonts), each with MiniLM captions of its
instances; `words` (label words), `captions` and `builder` (the tfds builder, whose docstring lists
the data config fields and layouts). Read it through `unialign_jax.data.pipeline`.
"""

from unialign_jax.data.numbers.builder import (
    DEFAULT_CONCEPTS,
    MODALITY_DATASETS,
    Numbers,
    NumbersConfig,
    default_config,
    make_builder,
)

__all__ = ["DEFAULT_CONCEPTS", "MODALITY_DATASETS", "Numbers", "NumbersConfig", "default_config", "make_builder"]
