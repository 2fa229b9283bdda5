"""The `synthetic` data source: a procedural multimodal world with known shared concepts.

`world.py` is the generative process (pure numpy); `builder.py` wraps it as a tfds builder whose
docstring lists the data config fields. Read it through `unialign_jax.data.pipeline`.
"""

from unialign_jax.data.synthetic.builder import Synthetic, SyntheticConfig, default_config, make_builder
from unialign_jax.data.synthetic.world import SyntheticWorld

__all__ = ["Synthetic", "SyntheticConfig", "SyntheticWorld", "default_config", "make_builder"]
