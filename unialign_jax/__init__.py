"""unialign_jax: unified multimodal representation learning in JAX/Flax (COMET, CMG/DCID, UniAlign).

`unialign_jax.load(path)` gives a trained model to embed with (`unialign_jax.inference`); it is
imported on first use, so `import unialign_jax` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from unialign_jax.inference import load  # pylint: disable=import-outside-toplevel

        return load
    raise AttributeError(f"module 'unialign_jax' has no attribute {name!r}")
